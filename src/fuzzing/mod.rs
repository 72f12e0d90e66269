//! Fuzz entry points: the properties the cargo-fuzz targets in `fuzz/` check (STYLE habit
//! 10; rustls' `fuzz_deframer`, linkerd's `http/fuzz.rs`). Reliability rows B7 and B8.
//!
//! Each `pub fn <target>(data: &[u8])` is one target: `fuzz/fuzz_targets/<target>.rs` only
//! calls it, and `tests/fuzz_seeds.rs` runs it over every file in `fuzz/seeds/<target>/`,
//! so CI, which does not fuzz, still checks the committed corpus. A property that does not
//! hold panics, which is what libFuzzer reports as a crash.
//!
//! Inputs are raw bytes given structure here (lines, chunk sizes, fields separated by
//! 0xFF) rather than `arbitrary`-derived structs: a test fixture is a meaningful seed as it
//! is, and the seed run needs no fuzzing crate. Where a target needs more than one value
//! (chunkings, size limits), they are drawn from a generator seeded with a hash of the
//! input, so every input has its own and replays identically.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::ops::Range;
use std::path::{Path, PathBuf};
use std::sync::OnceLock;
use std::sync::atomic::{AtomicU64, Ordering};

use smtp_proto::Request;

use crate::admin::preview;
use crate::auth::{
    self, ArcCheck, AuthReport, AuthResult, DkimCheck, DmarcCheck, SpfCheck, SpfPair, headers,
};
use crate::config::{Config, Purpose};
use crate::policy::rules::{ActionKind, Facts, KNOWN_FLAGS, Policy};
use crate::policy::spoof::{self, Flag, SpoofConfig, SpoofInput};
use crate::relay::client::{Capabilities, mail_command, rcpt_command};
use crate::relay::writer;
use crate::relay::xclient::{self, ClientIdentity};
use crate::wire::codec::{DataReader, canonicalize};
use crate::wire::command;
use crate::wire::reply::{self, Reply};

mod session;
pub use session::session;

/// A target: panics when a property does not hold for the input.
pub type Target = fn(&[u8]);

/// Every target, by the name of its `fuzz/fuzz_targets/<name>.rs` and `fuzz/seeds/<name>/`.
pub const TARGETS: &[(&str, Target)] = &[
    ("smtp_commands", smtp_commands),
    ("data_reader", data_reader),
    ("reply_parser", reply_parser),
    ("message_verification", message_verification),
    ("spf_record", spf_record),
    ("config_policy", config_policy),
    ("xclient", xclient),
    ("session", session),
];

/// The authserv-id and verdict header the message checks use.
const AUTHSERV_ID: &str = "mx.example.org";
const VERDICT_HEADER: &str = "X-Mailwarden-Verdict";

// ---------------------------------------------------------------------------------------
// smtp_commands
// ---------------------------------------------------------------------------------------

/// Client bytes split into lines (as the line reader does, at LF). Every line parses to
/// a command or to a well-formed 5xx reply; a parsed MAIL or RCPT rebuilt for the next hop
/// is one clean command line that the next hop parses back to the same address.
pub fn smtp_commands(data: &[u8]) {
    for line in data.split_inclusive(|&b| b == b'\n') {
        match command::parse(line) {
            Err(reply) => {
                assert!(reply.is_permanent(), "{reply:?}");
                assert_wellformed_reply(&reply.to_bytes());
            }
            Ok(cmd) => check_command(&cmd),
        }
    }
}

fn check_command(cmd: &command::Command) {
    let _ = command::is_junk(cmd);
    let caps = Capabilities {
        size: Some(0),
        eight_bit_mime: true,
        smtputf8: true,
        dsn: true,
        ..Capabilities::default()
    };
    // Found by fuzzing and fixed (tests/fuzz_regressions.rs): quoted local parts are
    // quoted again towards the next hop; non-ASCII ENVID/ORCPT bytes are refused as
    // invalid UTF-8. ENVID/ORCPT values are still compared only when ASCII.
    let (line, address) = match cmd {
        Request::Helo { host } | Request::Ehlo { host } | Request::Lhlo { host } => {
            assert_no_line_breaks(host.as_bytes(), "HELO argument");
            return;
        }
        Request::Mail { from } => {
            let mut from = from.clone();
            from.env_id = from.env_id.filter(|e| e.is_ascii());
            (mail_command(&from, &caps, 1000), from.address)
        }
        Request::Rcpt { to } => {
            let mut to = to.clone();
            to.orcpt = to.orcpt.filter(|o| o.is_ascii());
            (rcpt_command(&to, &caps), to.address)
        }
        _ => return,
    };
    assert_command_line(&line);
    if address.eq_ignore_ascii_case("postmaster") {
        // smtp-proto (the model of the next hop) reads `<postmaster>` as an empty path;
        // real MTAs take it (RFC 5321 §4.5.1), so the line itself is checked.
        assert!(
            line.starts_with(&format!("RCPT TO:<{address}>")),
            "{line:?}"
        );
        return;
    }
    let seen = match next_hop_parse(&line) {
        Ok(Request::Mail { from }) => from.address,
        Ok(Request::Rcpt { to }) => to.address,
        other => panic!("the next hop cannot parse {line:?}: {other:?}"),
    };
    assert_eq!(
        seen, address,
        "the next hop reads another address from {line:?}"
    );
}

/// How an SMTP server (smtp-proto standing in for the next hop) reads a command we send.
fn next_hop_parse(line: &str) -> Result<Request<String>, smtp_proto::Error> {
    Request::parse(&mut line.as_bytes().iter()).map(|r| r.into_owned())
}

/// One command line: its only CR and LF are the final CRLF, no NUL.
fn assert_command_line(line: &str) {
    let body = line
        .strip_suffix("\r\n")
        .unwrap_or_else(|| panic!("{line:?} does not end in CRLF"));
    assert_no_line_breaks(body.as_bytes(), line);
}

fn assert_no_line_breaks(bytes: &[u8], what: &str) {
    assert!(
        !bytes.iter().any(|&b| matches!(b, b'\r' | b'\n' | 0)),
        "CR, LF or NUL in {what:?}"
    );
}

/// Panics unless `wire` is one well-formed SMTP reply (RFC 5321 §4.2): `DDD-text` lines
/// then one `DDD text` (or bare `DDD`) line, one code in 200..=599 throughout, every line
/// ending in CRLF with no other CR or LF, printable ASCII text, at most 512 octets a line.
pub fn assert_wellformed_reply(wire: &[u8]) {
    let body = wire
        .strip_suffix(b"\r\n")
        .unwrap_or_else(|| panic!("reply {wire:?} does not end in CRLF"));
    let lines: Vec<&[u8]> = body.split(|&b| b == b'\n').collect();
    let mut code = None;
    for (i, line) in lines.iter().enumerate() {
        let line = if i + 1 < lines.len() {
            line.strip_suffix(b"\r")
                .unwrap_or_else(|| panic!("bare LF in reply {wire:?}"))
        } else {
            line
        };
        assert!(line.len() + 2 <= 512, "reply line over 512 octets");
        assert!(
            line.len() >= 3 && line[..3].iter().all(u8::is_ascii_digit),
            "reply line {line:?} does not start with a code"
        );
        let c = &line[..3];
        let n = c.iter().fold(0u16, |n, d| n * 10 + u16::from(d - b'0'));
        assert!((200..=599).contains(&n), "reply code {n}");
        assert_eq!(*code.get_or_insert(c), c, "codes differ in {wire:?}");
        let last = i + 1 == lines.len();
        match line.get(3) {
            Some(b'-') => assert!(!last, "last line continues: {wire:?}"),
            Some(b' ') | None => assert!(last, "line {i} ends the reply early: {wire:?}"),
            Some(other) => panic!("byte {other} after the code in {wire:?}"),
        }
        assert!(
            line.iter().all(|&b| (b' '..=b'~').contains(&b)),
            "control or non-ASCII byte in reply {wire:?}"
        );
    }
}

// ---------------------------------------------------------------------------------------
// data_reader
// ---------------------------------------------------------------------------------------

/// The bytes after `DATA`, fed to the DATA reader whole and in chunkings drawn from the
/// input (B8): the end of data, the bytes consumed, the statistics and the content are the
/// same whatever the chunking; the content is canonical (every CR in a CRLF); encoded for
/// the next hop it holds exactly one end-of-data, at its end, and reads back to itself.
pub fn data_reader(data: &[u8]) {
    let mut rng = Rng::new(data);
    // Mostly no limit; sometimes one the input may cross (the drain-after-limit path).
    let limit = if rng.below(4) == 0 {
        rng.below(data.len() as u64 + 64) as usize
    } else {
        usize::MAX
    };
    let whole = read_chunked(data, limit, std::iter::empty());
    check_data_run(&whole, data.len(), limit);

    // Short input: one byte at a time, and split in two at every offset (B8); longer
    // input: split at some offsets. Then a few chunkings of mixed sizes, some longer than
    // the 8 KiB a long line is passed on in.
    let mut chunkings: Vec<Vec<usize>> = Vec::new();
    if data.len() <= 128 {
        chunkings.push(vec![1; data.len()]);
        chunkings.extend((1..data.len()).map(|at| vec![at]));
    } else {
        chunkings.extend((0..16).map(|_| vec![1 + rng.below(data.len() as u64 - 1) as usize]));
    }
    for _ in 0..4 {
        let mut sizes = Vec::new();
        let mut total = 0;
        while total < data.len() {
            let n = 1 + match rng.below(8) {
                0..=1 => rng.below(16),
                2..=5 => rng.below(600),
                _ => rng.below(12_000),
            } as usize;
            sizes.push(n);
            total += n;
        }
        chunkings.push(sizes);
    }
    for sizes in &chunkings {
        let run = read_chunked(data, limit, sizes.iter().copied());
        if run.out != whole.out {
            check_data_run(&run, data.len(), limit);
        }
        let at = || format!("chunks {:?}", &sizes[..sizes.len().min(16)]);
        assert_eq!(run.done, whole.done, "end of data differs, {}", at());
        if whole.done {
            assert_eq!(run.consumed, whole.consumed, "consumed differs, {}", at());
            assert_eq!(run.size, whole.size, "size differs, {}", at());
            assert_eq!(run.too_big, whole.too_big, "too_big differs, {}", at());
            assert_eq!(
                run.bare_lf,
                whole.bare_lf,
                "bare LF count differs, {}",
                at()
            );
            assert_eq!(
                run.bare_cr,
                whole.bare_cr,
                "bare CR count differs, {}",
                at()
            );
            assert_eq!(
                run.long_lines,
                whole.long_lines,
                "long lines differ, {}",
                at()
            );
            // Past the limit the content is thrown away; what was kept may differ.
            if !whole.too_big {
                assert!(run.out == whole.out, "content differs, {}", at());
            }
        } else if !run.too_big && !whole.too_big {
            // The client has not finished: a long last line may be passed on in fewer
            // pieces so far, never in different ones.
            assert!(whole.out.starts_with(&run.out), "content differs, {}", at());
        }
    }
}

struct DataRun {
    out: Vec<u8>,
    consumed: usize,
    done: bool,
    size: usize,
    too_big: bool,
    bare_lf: usize,
    bare_cr: usize,
    long_lines: usize,
}

/// Feeds `input` to a [`DataReader`] the way `SmtpStream::read_data` does: read a chunk,
/// append it to the unconsumed bytes, ingest, drop what was consumed.
fn read_chunked(input: &[u8], limit: usize, sizes: impl Iterator<Item = usize>) -> DataRun {
    let mut reader = DataReader::new(limit);
    let (mut out, mut buf) = (Vec::new(), Vec::new());
    let (mut pos, mut consumed, mut done) = (0, 0, false);
    let mut sizes = sizes.chain(std::iter::repeat(usize::MAX));
    while pos < input.len() && !done {
        let n = sizes
            .next()
            .unwrap_or(usize::MAX)
            .clamp(1, input.len() - pos);
        buf.extend_from_slice(&input[pos..pos + n]);
        pos += n;
        let (c, d) = reader.ingest(&buf, &mut out);
        assert!(c <= buf.len(), "consumed more than it was given");
        buf.drain(..c);
        consumed += c;
        done = d;
    }
    let s = reader.stats;
    DataRun {
        out,
        consumed,
        done,
        size: s.size,
        too_big: s.too_big,
        bare_lf: s.bare_lf,
        bare_cr: s.bare_cr,
        long_lines: s.long_lines,
    }
}

fn check_data_run(run: &DataRun, input_len: usize, limit: usize) {
    assert!(run.consumed <= input_len);
    assert_eq!(run.too_big, run.size > limit, "too_big and size disagree");
    assert!(
        run.out.len() <= limit.min(run.size),
        "kept more than the limit"
    );
    if !run.too_big {
        assert_eq!(run.out.len(), run.size, "size is not the canonical size");
    }
    assert_canonical(&run.out, "DATA content");
    let encoded = writer::encode_parts(&[], &[&run.out]);
    assert_one_end_of_data(&encoded);
    let mut expected = run.out.clone();
    if !expected.is_empty() && !expected.ends_with(b"\r\n") {
        expected.extend_from_slice(b"\r\n");
    }
    assert!(
        read_back(&encoded) == expected,
        "the next hop reads other content"
    );
}

/// Every LF is preceded by CR and every CR followed by LF.
fn assert_canonical(bytes: &[u8], what: &str) {
    for (i, &b) in bytes.iter().enumerate() {
        if b == b'\n' {
            assert!(i > 0 && bytes[i - 1] == b'\r', "bare LF at {i} in {what}");
        }
        if b == b'\r' {
            assert_eq!(bytes.get(i + 1), Some(&b'\n'), "bare CR at {i} in {what}");
        }
    }
}

/// What the next hop receives after DATA (RFC 5321 §4.5.2): canonical lines, every line
/// starting with `.` stuffed, and one end-of-data: `.<CRLF>` alone for an empty message,
/// else `<CRLF>.<CRLF>` at the very end and nowhere else (SMTP smuggling).
fn assert_one_end_of_data(encoded: &[u8]) {
    assert_canonical(encoded, "encoded DATA");
    assert!(encoded.ends_with(b".\r\n"), "no final .CRLF");
    if encoded.len() > 3 {
        let ends = encoded.windows(5).filter(|w| w == b"\r\n.\r\n").count();
        assert_eq!(ends, 1, "{ends} end-of-data sequences");
        assert!(encoded.ends_with(b"\r\n.\r\n"));
    } else {
        assert_eq!(encoded, b".\r\n");
    }
    let body = &encoded[..encoded.len() - 3];
    for line in body.split(|&b| b == b'\n') {
        assert!(
            !line.starts_with(b".") || line.starts_with(b".."),
            "unstuffed dot line"
        );
    }
}

/// The content a next hop reads from `encoded` (itself a DATA reader): all of it must be
/// consumed, ending exactly at the end.
fn read_back(encoded: &[u8]) -> Vec<u8> {
    let mut reader = DataReader::new(usize::MAX);
    let mut out = Vec::new();
    let (consumed, done) = reader.ingest(encoded, &mut out);
    assert!(done, "the next hop never sees the end of data");
    assert_eq!(consumed, encoded.len(), "the next hop sees the end early");
    out
}

// ---------------------------------------------------------------------------------------
// reply_parser
// ---------------------------------------------------------------------------------------

/// Next-hop reply lines, grouped as the relay client reads them (up to a last line) and
/// also all at once: a parsed reply renders well-formed and parses back to the same code,
/// enhanced code and number of lines.
pub fn reply_parser(data: &[u8]) {
    let text = String::from_utf8_lossy(data);
    let lines: Vec<String> = text
        .split_inclusive('\n')
        .map(|l| l.trim_end_matches(['\r', '\n']).to_string())
        .collect();
    let mut group = Vec::new();
    for line in &lines {
        let _ = reply::split_code(line);
        group.push(line.clone());
        if reply::is_last_line(line) {
            check_reply(&group);
            group.clear();
        }
    }
    check_reply(&group);
    check_reply(&lines);
}

fn check_reply(lines: &[String]) {
    let Some(r) = Reply::from_lines(lines) else {
        return;
    };
    assert!((200..=599).contains(&r.code));
    assert_eq!(r.lines.len(), lines.len());
    let wire = r.to_bytes();
    assert_wellformed_reply(&wire);
    let rendered: Vec<String> = String::from_utf8(wire)
        .expect("replies are ASCII")
        .split_terminator("\r\n")
        .map(str::to_string)
        .collect();
    let again = Reply::from_lines(&rendered)
        .unwrap_or_else(|| panic!("rendered reply {rendered:?} does not parse"));
    assert_eq!(again.code, r.code, "{rendered:?}");
    if r.enhanced.is_some() {
        assert_eq!(again.enhanced, r.enhanced, "{rendered:?}");
    }
    assert_eq!(again.lines.len(), r.lines.len().max(1), "{rendered:?}");
    let _ = (r.summary(), r.is_positive(), r.closes_session());
}

// ---------------------------------------------------------------------------------------
// message_verification
// ---------------------------------------------------------------------------------------

/// A message through everything that reads it without the network: canonical form, header
/// fields, forged-header stripping and the relay encoding, From parsing and the spoof
/// flags, mail-auth's message parser, and the quarantine preview.
pub fn message_verification(data: &[u8]) {
    // Canonical form (the `check` command): canonical, stable, and what the DATA reader
    // gives for the same message written to the wire by the relay writer.
    let canonical = canonicalize(data);
    assert_canonical(&canonical, "canonicalize");
    assert!(
        canonicalize(&canonical) == canonical,
        "canonicalize is not idempotent"
    );
    let wire = writer::encode_parts(&[], &[data]);
    assert_one_end_of_data(&wire);
    assert!(
        read_back(&wire) == canonical,
        "canonicalize and the DATA reader disagree"
    );

    // The live path sees canonical messages; the raw bytes must not make anything panic.
    check_relay_path(&canonical);
    let raw_fields = headers::fields(data);
    check_fields(data, &raw_fields);
    let _ = headers::forged_ranges(&raw_fields, AUTHSERV_ID, VERDICT_HEADER);

    check_spoof(&headers::fields(&canonical));

    if let Some(m) = mail_auth::AuthenticatedMessage::parse(data) {
        assert!(m.body_offset() <= data.len());
        let _ = m
            .from()
            .rsplit_once('@')
            .map(|(_, d)| d.to_ascii_lowercase());
        for h in &m.dkim_headers {
            let _ = (&h.header.d, &h.header.s);
        }
    }

    for (name, value) in preview::header_summary(data) {
        assert_display_safe(&value, &name);
    }
    let text = preview::text_preview(data, 200);
    assert_display_safe(&text, "preview");
    assert!(text.chars().count() <= 200 + "\n[…]".chars().count());
}

/// Header fields lie in the header section, in order, whole lines each.
fn check_fields(message: &[u8], fields: &[headers::Field<'_>]) {
    let mut pos = 0;
    for f in fields {
        let Range { start, end } = f.range;
        assert!(
            pos <= start && start < end && end <= message.len(),
            "{:?}",
            f.range
        );
        assert!(
            start == 0 || message[start - 1] == b'\n',
            "field not at a line start"
        );
        assert!(
            end == message.len() || message[end - 1] == b'\n',
            "field not whole lines"
        );
        assert!(!f.name.contains(':'));
        pos = end;
    }
}

/// Forged `Authentication-Results` and verdict headers are stripped, ours go on top; the
/// next hop reads our headers as written and no other claiming our authserv-id.
fn check_relay_path(message: &[u8]) {
    let fields = headers::fields(message);
    check_fields(message, &fields);
    let strip = headers::forged_ranges(&fields, AUTHSERV_ID, VERDICT_HEADER);
    assert!(strip.windows(2).all(|w| w[0].end <= w[1].start));
    let edits: Vec<writer::Edit> = strip.iter().cloned().map(writer::Edit::remove).collect();
    let parts = writer::edited(message, &edits);
    let stripped: usize = strip.iter().map(|r| r.len()).sum();
    assert_eq!(
        parts.iter().map(|p| p.len()).sum::<usize>() + stripped,
        message.len()
    );

    let added = [
        format!("Authentication-Results: {AUTHSERV_ID}; spf=pass smtp.mailfrom=example.org"),
        format!("{VERDICT_HEADER}: tag; rule=default; flags=none; reasons=none"),
    ];
    let encoded = writer::encode_parts(&added, &parts);
    // What the relay really sends (vectored, the message not copied) is the same bytes.
    assert_eq!(writer::Encoded::new(&added, &parts).to_vec(), encoded);
    assert_one_end_of_data(&encoded);
    let relayed = read_back(&encoded);
    // A BDAT chunk (a next hop with CHUNKING) carries exactly what a DATA receiver reads.
    let chunk = writer::Encoded::framed(&added, &parts, writer::Framing::Chunk);
    assert_eq!(
        chunk.to_vec(),
        relayed,
        "BDAT and DATA deliver different bytes"
    );
    assert_eq!(chunk.size(), relayed.len());
    // Our headers, then the guard that keeps a leading folded line from continuing them.
    let guard = writer::orphan_fold_guard(&added, &parts);
    let ours: Vec<u8> = added
        .iter()
        .map(String::as_str)
        .chain(guard)
        .flat_map(|h| [h.as_bytes(), b"\r\n"])
        .flatten()
        .copied()
        .collect();
    assert!(
        relayed.starts_with(&ours),
        "our headers reach the next hop changed"
    );
    let rest = &relayed[ours.len()..];
    assert!(
        rest == parts.concat(),
        "the message reaches the next hop changed"
    );
    // A leading folded line continues the guard, never a header we added.
    assert!(
        guard.is_some() || !(rest.starts_with(b" ") || rest.starts_with(b"\t")),
        "the message continues our last header"
    );
    let forged = headers::forged_ranges(&headers::fields(rest), AUTHSERV_ID, VERDICT_HEADER);
    assert!(forged.is_empty(), "a forged header reaches the next hop");
}

fn spoof_config() -> &'static SpoofConfig {
    static CONFIG: OnceLock<SpoofConfig> = OnceLock::new();
    CONFIG.get_or_init(|| {
        SpoofConfig::new(
            &[
                "example.org".into(),
                "bücher.example".into(),
                "example.co.uk".into(),
            ],
            &["Alice Example".into(), "Bob".into()],
            2,
        )
    })
}

/// From parsing and the spoof flags under every combination of listener and DMARC result.
fn check_spoof(fields: &[headers::Field<'_>]) {
    for f in fields {
        if ["From", "Sender", "Reply-To"]
            .iter()
            .any(|n| f.name.eq_ignore_ascii_case(n))
        {
            let _ = spoof::parse_from_header(&f.value);
        }
    }
    let (display_name, from_address) = headers::first(fields, "From")
        .map(|f| spoof::parse_from_header(&f.value))
        .unwrap_or_default();
    let mail_from = headers::first(fields, "Return-Path")
        .map(|f| spoof::parse_from_header(&f.value).1)
        .unwrap_or_default();
    for inbound in [true, false] {
        for dmarc_pass in [true, false] {
            let flags = spoof::check(
                spoof_config(),
                &SpoofInput {
                    from_display_name: &display_name,
                    from_address: &from_address,
                    mail_from: &mail_from,
                    inbound,
                    dmarc_pass,
                },
            );
            let mut seen: Vec<Flag> = flags.iter().map(|(f, _)| *f).collect();
            seen.sort();
            seen.dedup();
            assert_eq!(seen.len(), flags.len(), "a flag twice: {flags:?}");
            for (flag, reason) in &flags {
                assert!(!reason.is_empty());
                assert!(Flag::parse(flag.as_str()) == Some(*flag));
            }
            if dmarc_pass || !inbound {
                assert!(!seen.contains(&Flag::OwnDomainSpoof), "{flags:?}");
            }
            if dmarc_pass {
                assert!(!seen.contains(&Flag::DisplayNameSpoof), "{flags:?}");
            }
        }
    }
}

/// Text for a terminal or a web page: no control characters but newline and tab.
fn assert_display_safe(text: &str, what: &str) {
    assert!(
        !text
            .chars()
            .any(|c| c.is_control() && c != '\n' && c != '\t'),
        "control character in {what}: {text:?}"
    );
}

// ---------------------------------------------------------------------------------------
// spf_record
// ---------------------------------------------------------------------------------------

/// A TXT record through the SPF record parser, as found and also after `v=spf1 ` (so
/// mutations reach the terms): the outcome is deterministic and does not depend on case
/// (§4.6.1, §7.1: names and macro letters are case-insensitive, uppercase letters only
/// URL-escape), and every query name it expands to is a valid DNS name (§7.3).
pub fn spf_record(data: &[u8]) {
    let text = String::from_utf8_lossy(data);
    for record in [text.to_string(), format!("v=spf1 {text}")] {
        let parsed = auth::spf::fuzz_parse_record(&record);
        assert_eq!(parsed, auth::spf::fuzz_parse_record(&record));
        for case in [record.to_ascii_lowercase(), record.to_ascii_uppercase()] {
            assert_eq!(
                auth::spf::fuzz_parse_record(&case).is_ok(),
                parsed.is_ok(),
                "{record:?} and {case:?} parse differently"
            );
        }
        for name in parsed.iter().flatten().flatten() {
            assert!(!name.is_empty() && name.len() <= 253, "query name {name:?}");
            assert!(
                name.split('.').all(|l| !l.is_empty() && l.len() <= 63),
                "query name {name:?}"
            );
        }
    }
}

// ---------------------------------------------------------------------------------------
// config_policy
// ---------------------------------------------------------------------------------------

/// Text as a config file (for running and for `check`) and as a policy file: errors name
/// a line inside the text; a loaded policy evaluates.
pub fn config_policy(data: &[u8]) {
    let text = String::from_utf8_lossy(data);
    let lines = text.split('\n').count();
    let line_ok = |line: Option<usize>| line.is_none_or(|l| (1..=lines).contains(&l));
    for purpose in [Purpose::Run, Purpose::Offline] {
        match Config::parse_for(&text, Path::new("fuzz.toml"), purpose) {
            Ok(config) => {
                if purpose == Purpose::Run {
                    let _ = config.next_hop_address();
                }
                let _ = (config.authserv_id(), config.policy_file());
                let _ = config.is_local_domain("example.org.");
            }
            Err(e) => {
                assert!(line_ok(e.line), "{e}: line out of range");
                let _ = e.to_string();
            }
        }
    }

    let path = policy_path();
    std::fs::write(&path, text.as_bytes()).expect("write the policy to a temporary file");
    let loaded = Policy::load(&path);
    let _ = std::fs::remove_file(&path);
    match loaded {
        Ok(policy) => {
            for result in [AuthResult::Pass, AuthResult::Fail, AuthResult::TempError] {
                let report = report_with(result);
                let flags: Vec<String> = KNOWN_FLAGS.iter().map(|f| f.to_string()).collect();
                let ev = policy.evaluate(&Facts {
                    report: Some(&report),
                    flags: &flags,
                    from_domain: "example.org",
                    mail_from_domain: "example.org",
                    rcpt_domains: &["example.net".to_string()],
                    list_id: Some("list.example.org"),
                    client_ip: IpAddr::V4(Ipv4Addr::new(192, 0, 2, 1)),
                    outbound: None,
                });
                let last = ev.trace.last().expect("a trace");
                assert!(last.matched && last.rule == ev.rule && !last.shadow);
                if ev.rule == "default" {
                    assert!(ev.action == ActionKind::Accept && ev.reason.is_none());
                }
            }
            let _ = policy.shadow_counts();
        }
        Err(e) => assert!(line_ok(e.line), "{e}: line out of range"),
    }
}

/// A policy file of this process and thread (tests run in threads, fuzzers in processes),
/// in memory when /dev/shm exists.
fn policy_path() -> PathBuf {
    static NEXT: AtomicU64 = AtomicU64::new(0);
    let dir = Path::new("/dev/shm");
    let dir = if dir.is_dir() {
        dir.to_path_buf()
    } else {
        std::env::temp_dir()
    };
    dir.join(format!(
        "mailwarden-fuzz-policy-{}-{}.toml",
        std::process::id(),
        NEXT.fetch_add(1, Ordering::Relaxed)
    ))
}

fn report_with(result: AuthResult) -> AuthReport {
    let spf = |domain: &str| SpfCheck {
        result,
        domain: domain.into(),
    };
    AuthReport {
        spf: SpfPair {
            mail_from: spf("example.org"),
            helo: spf("mx.example.org"),
        },
        dkim: vec![DkimCheck {
            result,
            domain: "example.org".into(),
            selector: "s1".into(),
            algorithm: "rsa-sha256".into(),
            reason: None,
            stale_secs: None,
        }],
        arc: ArcCheck {
            result,
            sealers: vec!["sealer.example".into()],
            latest_sealer: Some("sealer.example".into()),
            vouching_sealer: Some("sealer.example".into()),
        },
        dmarc: DmarcCheck {
            policy: Some("reject"),
            published_policy: Some("reject"),
            ..DmarcCheck::without_record(result, "example.org".into())
        },
        work: Default::default(),
        stale: Default::default(),
    }
}

// ---------------------------------------------------------------------------------------
// xclient
// ---------------------------------------------------------------------------------------

/// XCLIENT lines for an arbitrary client. Input: a flag byte (bit 0 ESMTP, bit 1 IPv6,
/// bit 2 HELO given, bit 3 login given), the address (4 or 16 bytes) and port (2 bytes),
/// then HELO, login and the attribute names offered by the next hop (separated by spaces;
/// none means all), separated by 0xFF bytes. Every line is `XCLIENT` and attributes, at
/// most 512 octets with its one CRLF at the end, printable ASCII; each attribute appears
/// once, only if offered, and HELO and LOGIN decode to a prefix of what was given.
pub fn xclient(data: &[u8]) {
    let flags = data.first().copied().unwrap_or(0);
    let mut rest = data.get(1..).unwrap_or_default();
    let mut take = |n: usize| {
        let mut out = [0u8; 16];
        let k = n.min(rest.len());
        out[..k].copy_from_slice(&rest[..k]);
        rest = &rest[k..];
        out
    };
    let ip = if flags & 2 != 0 {
        IpAddr::V6(Ipv6Addr::from(take(16)))
    } else {
        let b = take(4);
        IpAddr::V4(Ipv4Addr::new(b[0], b[1], b[2], b[3]))
    };
    let p = take(2);
    let port = u16::from_be_bytes([p[0], p[1]]);
    let mut fields = rest.split(|&b| b == 0xFF);
    let mut next = || String::from_utf8_lossy(fields.next().unwrap_or_default()).into_owned();
    let (helo, login, offered) = (next(), next(), next());
    let offered: Vec<String> = offered.split(' ').map(str::to_string).collect();
    let offered: Vec<String> = offered.into_iter().filter(|a| !a.is_empty()).collect();
    let client = ClientIdentity {
        addr: SocketAddr::new(ip, port),
        helo: (flags & 4 != 0).then_some(helo),
        esmtp: flags & 1 != 0,
        login: (flags & 8 != 0).then_some(login),
    };

    let lines = xclient::commands(&client, &offered);
    let mut seen: Vec<String> = Vec::new();
    for line in &lines {
        assert!(line.len() <= 512, "{} octets", line.len());
        let body = line
            .strip_suffix("\r\n")
            .unwrap_or_else(|| panic!("{line:?} does not end in CRLF"));
        assert!(
            body.bytes().all(|b| (b' '..=b'~').contains(&b)),
            "{line:?} is not printable ASCII"
        );
        let mut words = body.split(' ');
        assert_eq!(words.next(), Some("XCLIENT"));
        let mut attrs = 0;
        for attr in words {
            attrs += 1;
            let (name, value) = attr
                .split_once('=')
                .unwrap_or_else(|| panic!("attribute {attr:?} in {line:?}"));
            assert!(!seen.iter().any(|s| s == name), "{name} twice");
            seen.push(name.to_string());
            assert!(
                offered.is_empty() || offered.iter().any(|o| o.eq_ignore_ascii_case(name)),
                "{name} was not offered"
            );
            let given = match name {
                "HELO" => client.helo.as_deref(),
                "LOGIN" => client.login.as_deref(),
                "ADDR" => {
                    let ip = ip.to_canonical();
                    let want = match ip {
                        IpAddr::V4(v4) => v4.to_string(),
                        IpAddr::V6(v6) => format!("IPV6:{v6}"),
                    };
                    assert_eq!(xtext_decode(value), want.as_bytes());
                    continue;
                }
                "PORT" => {
                    assert_eq!(value, port.to_string());
                    continue;
                }
                "NAME" | "PROTO" => continue,
                other => panic!("unexpected attribute {other}"),
            };
            match given {
                // Cut to 255 encoded octets, never inside a +XX.
                Some(given) => {
                    assert!(value.len() <= 255);
                    let decoded = xtext_decode(value);
                    assert!(given.as_bytes().starts_with(&decoded), "{name}={value}");
                    if xclient::xtext(given).len() <= 255 {
                        assert_eq!(decoded, given.as_bytes());
                    }
                }
                None => assert_eq!(value, "[UNAVAILABLE]"),
            }
        }
        assert!(attrs > 0, "empty XCLIENT line");
    }
}

/// RFC 3461 xtext decoding; panics on anything that is not xtext.
fn xtext_decode(value: &str) -> Vec<u8> {
    let b = value.as_bytes();
    let mut out = Vec::new();
    let mut i = 0;
    while i < b.len() {
        assert!(
            (b'!'..=b'~').contains(&b[i]) && b[i] != b'=',
            "{value:?} is not xtext"
        );
        if b[i] == b'+' {
            let hex = value.get(i + 1..i + 3).expect("+XX");
            assert!(
                hex.bytes()
                    .all(|c| c.is_ascii_digit() || (b'A'..=b'F').contains(&c))
            );
            out.push(u8::from_str_radix(hex, 16).expect("hex"));
            i += 3;
        } else {
            out.push(b[i]);
            i += 1;
        }
    }
    out
}

// ---------------------------------------------------------------------------------------

/// xorshift64*, seeded with FNV-1a of the input: the input's own chunk sizes and limits.
struct Rng(u64);

impl Rng {
    fn new(data: &[u8]) -> Rng {
        let mut h: u64 = 0xcbf2_9ce4_8422_2325;
        for &b in data {
            h = (h ^ u64::from(b)).wrapping_mul(0x0000_0100_0000_01b3);
        }
        Rng(h | 1)
    }

    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }

    /// A number below `n` (0 for n = 0).
    fn below(&mut self, n: u64) -> u64 {
        if n == 0 { 0 } else { self.next() % n }
    }
}
