//! Hostile input against the real `mailwarden run` (issue 7 "Hostile input"; RELIABILITY.md
//! B1–B6 and S1/S3), each checked where it matters: at the next hop (a fake MTA that
//! records the raw transcript and, for smuggling, itself ends DATA at `<LF>.<LF>` and the
//! other non-standard sequences), in the proxy's log, and in the replies.
//!
//! Already covered elsewhere and not repeated here: the six basic smuggling vectors,
//! `bare_lf = "reject"`, 4097-octet and 20,000-octet command lines, 101 recipients with
//! `max_recipients = 100`, 51 `Received:` headers, the idle timeout, the error limit and
//! SIZE= values that overflow 64 bits (golden transcripts, `tests/transcripts/`);
//! STARTTLS injection on both sides, a bare CR in EHLO and client XCLIENT/XFORWARD
//! (`tests/smtp_security.rs`); path-like quarantine ids (`tests/quarantine.rs`,
//! `tests/admin_api.rs`).
//!
//! What this file adds (the README's "hostile inputs tried" list is printed by each test
//! with `--nocapture`):
//!
//! 1. smuggling: 17 more vectors (`<CR><LF>.<CR>`, NUL, space and TAB next to the dot,
//!    doubled line ends, a vector at the very start of the content, after a 9000-octet
//!    line, two in one message), each sent in one write and one byte at a time, all at a
//!    lenient next hop;
//! 2. 100 KB, 998-, 999- and 1000-octet content lines and a long line starting with a dot:
//!    byte for byte at the next hop, counted in the transaction log line;
//! 3. 10,000 RCPTs in one transaction, with the error limits lifted (the first 1,000
//!    forwarded, 9,000 × `452 4.5.3`, DATA still works) and with the default ones;
//! 4. a 1 MB header section (16,000 fields), one 1 MB folded field, 1,000 nested multiparts
//!    and 1,000 nested `message/rfc822` parts (quarantined, then previewed through the admin
//!    API and `quarantine show`);
//! 5. 30 malformed DKIM signatures and key records;
//! 6. SPF include and redirect loops, a 60-include chain, 50 void lookups (flat, chained,
//!    `exists:`), an MX with 20 names;
//! 7. SMTPUTF8 to a next hop with and without SMTPUTF8; non-ASCII without the parameter;
//! 8. invalid UTF-8 in EHLO, HELO, MAIL, RCPT, ENVID, ORCPT, VRFY;
//! 9. CR, LF and NUL in every parameter that reaches the next hop or a log line;
//! 10. slowloris: 50 sessions trickling a byte a second next to 20 normal ones.
//!
//! Every wait is bounded; everything listens on 127.0.0.0/8.

mod admin_common;
mod common;

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::Path;
use std::time::{Duration, Instant};

use base64::Engine;
use common::dns::{DnsServer, Zone};
use common::fake_mta::{FakeMta, Script};
use common::smtp_client::{Client, Reply, dot_stuff_and_terminate, simple_message};
use common::{Proxy, ProxyOptions, STEP, bin, bounded, contains, rss_kib, show};
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};

/// The proxy's host name (harness default): our authserv-id.
const AUTHSERV_ID: &str = "mailwarden.test";

// ===========================================================================
// Shared checks
// ===========================================================================

/// Connects to `addr` from the loopback address `ip` (127.0.0.0/8 is all local), so
/// the proxy sees a different client than 127.0.0.1.
async fn connect_from(ip: &str, addr: SocketAddr) -> Client {
    let sock = tokio::net::TcpSocket::new_v4().expect("socket");
    sock.bind(format!("{ip}:0").parse().expect("ip"))
        .expect("bind a loopback source address");
    let tcp = tokio::time::timeout(STEP, sock.connect(addr))
        .await
        .expect("connect timed out")
        .expect("connect");
    Client::from_tcp(tcp)
}

/// RFC 3461 xtext as mailwarden must write it: `!`..`~` except `+` and `=`, or `+HH`.
fn is_xtext(v: &str) -> bool {
    let b = v.as_bytes();
    let mut i = 0;
    while i < b.len() {
        match b[i] {
            b'+' => {
                let hex = |c: u8| c.is_ascii_digit() || (b'A'..=b'F').contains(&c);
                if i + 2 >= b.len() || !hex(b[i + 1]) || !hex(b[i + 2]) {
                    return false;
                }
                i += 3;
            }
            b'=' => return false,
            c if (b'!'..=b'~').contains(&c) => i += 1,
            _ => return false,
        }
    }
    true
}

/// Splits `<path> params` (the text after `FROM:` / `TO:`); checks the path is one
/// well-formed, correctly quoted mailbox (or `<>` when `null_ok`). Returns the path and
/// the parameter text.
fn split_path(s: &str, null_ok: bool, utf8_ok: bool) -> Result<(String, String), String> {
    let rest = s
        .strip_prefix('<')
        .ok_or_else(|| format!("path does not start with '<': {s:?}"))?;
    if let Some(after) = rest.strip_prefix('>') {
        return if null_ok {
            Ok((String::new(), after.to_string()))
        } else {
            Err("empty path".into())
        };
    }
    let path_end = rest.find('>').unwrap_or(rest.len());
    if !utf8_ok && !rest[..path_end].is_ascii() {
        return Err("non-ASCII address without SMTPUTF8".into());
    }
    let chars: Vec<char> = rest.chars().collect();
    let mut i = 0;
    let atext = |c: char| c.is_ascii_alphanumeric() || "!#$%&'*+-/=?^_`{|}~.".contains(c);
    let ok_8bit = |c: char| !c.is_ascii() && utf8_ok && c != '\u{FFFD}';
    // Local part: a dot-atom or a quoted string.
    if chars.first() == Some(&'"') {
        i = 1;
        loop {
            match chars.get(i) {
                None => return Err("unterminated quoted local part".into()),
                Some('"') => {
                    i += 1;
                    break;
                }
                Some('\\') => {
                    match chars.get(i + 1) {
                        Some(c) if (' '..='~').contains(c) => {}
                        other => return Err(format!("bad quoted-pair {other:?}")),
                    }
                    i += 2;
                }
                Some(&c) if (' '..='~').contains(&c) || ok_8bit(c) => i += 1,
                Some(c) => return Err(format!("{c:?} in a quoted local part")),
            }
        }
    } else {
        let start = i;
        while let Some(&c) = chars.get(i) {
            if atext(c) || ok_8bit(c) {
                i += 1;
            } else {
                break;
            }
        }
        if i == start {
            return Err(format!("empty or invalid local part in {s:?}"));
        }
    }
    if chars.get(i) != Some(&'@') {
        return Err(format!("no '@' after the local part in {s:?}"));
    }
    i += 1;
    let start = i;
    while let Some(&c) = chars.get(i) {
        if c.is_ascii_alphanumeric() || matches!(c, '-' | '.' | '[' | ']' | ':') || ok_8bit(c) {
            i += 1;
        } else {
            break;
        }
    }
    if i == start {
        return Err(format!("empty domain in {s:?}"));
    }
    if chars.get(i) != Some(&'>') {
        return Err(format!(
            "path not closed right after the domain (injected text?) in {s:?}"
        ));
    }
    let path: String = chars[..i].iter().collect();
    let params: String = chars[i + 1..].iter().collect();
    Ok((path, params))
}

/// Per-connection state of [`check_command`].
#[derive(Default)]
struct CmdState {
    smtputf8: bool,
    sasl: bool,
}

/// Whether one command line the next hop received is one mailwarden may send: a known
/// verb built from parsed values, every parameter in its canonical encoding, ≤ 512
/// octets with its CRLF, no control characters, non-ASCII only in the paths of an
/// SMTPUTF8 transaction.
fn check_command(line: &str, st: &mut CmdState) -> Result<(), String> {
    if line.len() + 2 > 512 {
        return Err(format!("{} octets", line.len() + 2));
    }
    if let Some(c) = line.chars().find(|c| c.is_control()) {
        return Err(format!("control character {c:?}"));
    }
    if line.contains('\u{FFFD}') {
        return Err("U+FFFD: the client's invalid UTF-8 was passed on".into());
    }
    let (verb, rest) = line.split_once(' ').unwrap_or((line, ""));
    let verb = verb.to_ascii_uppercase();
    let was_sasl = std::mem::take(&mut st.sasl);
    let ascii = || {
        if line.is_ascii() {
            Ok(())
        } else {
            Err("non-ASCII outside an SMTPUTF8 path".to_string())
        }
    };
    match verb.as_str() {
        "DATA" | "RSET" | "QUIT" | "NOOP" | "STARTTLS" if rest.is_empty() => {
            if verb == "RSET" {
                st.smtputf8 = false;
            }
            Ok(())
        }
        "EHLO" | "HELO" => {
            if !rest.is_empty() && rest.bytes().all(|b| b.is_ascii_graphic()) {
                Ok(())
            } else {
                Err("EHLO argument is not one printable ASCII token".into())
            }
        }
        "XCLIENT" => {
            ascii()?;
            for attr in rest.split(' ') {
                let (k, v) = attr
                    .split_once('=')
                    .ok_or_else(|| format!("XCLIENT attribute without '=': {attr:?}"))?;
                let ok = match k {
                    "NAME" | "HELO" | "LOGIN" | "ADDR" | "DESTADDR" => {
                        v == "[UNAVAILABLE]" || is_xtext(v)
                    }
                    "PORT" | "DESTPORT" => !v.is_empty() && v.bytes().all(|b| b.is_ascii_digit()),
                    "PROTO" => v == "SMTP" || v == "ESMTP",
                    _ => false,
                };
                if !ok {
                    return Err(format!("XCLIENT attribute {attr:?}"));
                }
            }
            Ok(())
        }
        "MAIL" => {
            let s = rest.strip_prefix("FROM:").ok_or("MAIL without FROM:")?;
            let utf8 = s.split(' ').any(|p| p.eq_ignore_ascii_case("SMTPUTF8"));
            let (_, params) = split_path(s, true, utf8)?;
            if !params.is_ascii() {
                return Err("non-ASCII MAIL parameter".into());
            }
            for p in params.split(' ').filter(|p| !p.is_empty()) {
                let (k, v) = p.split_once('=').unwrap_or((p, ""));
                let ok = match k {
                    "SIZE" => !v.is_empty() && v.bytes().all(|b| b.is_ascii_digit()),
                    "BODY" => v == "7BIT" || v == "8BITMIME",
                    "SMTPUTF8" => v.is_empty() && !p.contains('='),
                    "RET" => v == "FULL" || v == "HDRS",
                    "ENVID" => !v.is_empty() && is_xtext(v),
                    _ => false,
                };
                if !ok || !params.starts_with(' ') {
                    return Err(format!("MAIL parameter {p:?}"));
                }
            }
            st.smtputf8 = utf8;
            Ok(())
        }
        "RCPT" => {
            let s = rest.strip_prefix("TO:").ok_or("RCPT without TO:")?;
            let (_, params) = split_path(s, false, st.smtputf8)?;
            if !params.is_ascii() {
                return Err("non-ASCII RCPT parameter".into());
            }
            for p in params.split(' ').filter(|p| !p.is_empty()) {
                let (k, v) = p.split_once('=').unwrap_or((p, ""));
                let ok = match k {
                    "NOTIFY" => v
                        .split(',')
                        .all(|n| matches!(n, "SUCCESS" | "FAILURE" | "DELAY" | "NEVER")),
                    "ORCPT" => v.strip_prefix("rfc822;").is_some_and(is_xtext),
                    _ => false,
                };
                if !ok || !params.starts_with(' ') {
                    return Err(format!("RCPT parameter {p:?}"));
                }
            }
            Ok(())
        }
        "AUTH" => {
            ascii()?;
            let mut w = rest.split(' ');
            let mech = w.next().unwrap_or("");
            let initial = w.next();
            let b64 = |s: &str| {
                !s.is_empty()
                    && s.bytes()
                        .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'+' | b'/' | b'='))
            };
            match (mech, initial, w.next()) {
                ("PLAIN", Some(i), None) if b64(i) => Ok(()),
                ("LOGIN", None, None) => {
                    st.sasl = true;
                    Ok(())
                }
                ("LOGIN", Some(i), None) if b64(i) => {
                    st.sasl = true;
                    Ok(())
                }
                _ => Err("malformed AUTH".into()),
            }
        }
        _ if was_sasl
            && line
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'+' | b'/' | b'=')) =>
        {
            // A SASL LOGIN response line (base64).
            st.sasl = true;
            Ok(())
        }
        _ => Err("not a command mailwarden sends".into()),
    }
}

/// Every command line every next-hop connection received that mailwarden should never
/// have sent, and any non-canonical byte in the transcript.
fn next_hop_violations(mta: &FakeMta) -> Vec<String> {
    let mut out = Vec::new();
    for c in mta.conns() {
        let mut st = CmdState::default();
        for cmd in &c.commands {
            if let Err(why) = check_command(cmd, &mut st) {
                out.push(format!("conn {}: {why}: {cmd:?}", c.id));
            }
        }
        for (i, &b) in c.transcript.iter().enumerate() {
            let bare_cr = b == b'\r' && c.transcript.get(i + 1) != Some(&b'\n');
            let bare_lf = b == b'\n' && (i == 0 || c.transcript[i - 1] != b'\r');
            if bare_cr || bare_lf {
                out.push(format!("conn {}: byte {b:#04x} non-canonical at {i}", c.id));
                break;
            }
        }
    }
    out
}

/// Timestamped text lines of the tracing formatter: `2026-11-26T02:11:54.521500Z  INFO ...`.
fn log_line_well_formed(line: &str) -> bool {
    let b = line.as_bytes();
    let digits =
        |r: std::ops::Range<usize>| b.get(r).is_some_and(|s| s.iter().all(u8::is_ascii_digit));
    let shape = b.len() > 28
        && digits(0..4)
        && b[4] == b'-'
        && digits(5..7)
        && b[7] == b'-'
        && digits(8..10)
        && b[10] == b'T'
        && b[13] == b':'
        && b[16] == b':'
        && b[19] == b'.';
    let level = line
        .split_once('Z')
        .map(|(_, r)| r.trim_start())
        .and_then(|r| r.split(' ').next())
        .is_some_and(|l| matches!(l, "TRACE" | "DEBUG" | "INFO" | "WARN" | "ERROR"));
    // The forged lines the injection tests try to plant are dated 2001.
    shape && level && !line.starts_with("2001-")
}

/// Lines of the proxy's log that it did not write as one event each (a raw CR, LF or
/// NUL from a client split or forged one).
fn log_violations(log: &str) -> Vec<String> {
    let mut out = Vec::new();
    if log.contains('\r') {
        out.push("raw CR in the log".to_string());
    }
    if log.contains('\0') {
        out.push("raw NUL in the log".to_string());
    }
    for line in log.split('\n').filter(|l| !l.is_empty()) {
        if !log_line_well_formed(line) {
            out.push(format!("not one well-formed log event: {line:?}"));
        }
    }
    out
}

#[track_caller]
fn assert_log_well_formed(proxy: &Proxy) {
    let v = log_violations(&proxy.log());
    assert!(v.is_empty(), "log injection:\n{}", v.join("\n"));
}

/// The proxy still serves: a fresh session relays a message.
async fn assert_still_serving(proxy: &Proxy, from: &str, rcpt: &str) {
    let mut c = proxy.connect_ehlo("after.example").await;
    let r = c
        .send_mail(
            from,
            &[rcpt],
            &simple_message(from, rcpt, "still-alive", "ok"),
        )
        .await;
    assert_eq!(
        r.code,
        250,
        "the proxy no longer relays: {r:?}\n{}",
        proxy.log()
    );
    let _ = c.cmd("QUIT").await;
}

/// Our `Authentication-Results` value (unfolded) at the top of a relayed message.
fn our_ar(data: &[u8]) -> Option<String> {
    let text = show(data);
    let head = text.split("\r\n\r\n").next().unwrap_or("");
    let unfolded = head.replace("\r\n\t", " ").replace("\r\n ", " ");
    unfolded
        .split("\r\n")
        .filter_map(|l| l.split_once(':'))
        .find(|(n, v)| {
            n.eq_ignore_ascii_case("Authentication-Results") && v.trim().starts_with(AUTHSERV_ID)
        })
        .map(|(_, v)| v.trim().to_string())
}

/// `method=result` words of an Authentication-Results value, e.g. all `dkim=` results.
fn results_of(ar: &str, method: &str) -> Vec<String> {
    ar.split(';')
        .map(str::trim)
        .filter_map(|r| r.strip_prefix(&format!("{method}=")))
        .map(|r| r.split_whitespace().next().unwrap_or("").to_string())
        .collect()
}

/// Runs `mailwarden ARGS` in `dir`, output to files, bounded in time; (success, stdout, stderr).
async fn run_bin(dir: &Path, args: &[&str]) -> (bool, String, String) {
    let mut command = std::process::Command::new(bin());
    command.args(args).current_dir(dir);
    let done = common::run_bounded(command, dir, Duration::from_secs(60)).await;
    assert!(
        done.status.is_some(),
        "mailwarden {args:?} did not finish within 60 s"
    );
    (done.success(), done.stdout_text(), done.stderr)
}

// ===========================================================================
// 1. SMTP smuggling, checked at a next hop that is itself vulnerable
// ===========================================================================

const SMUGGLED: &[u8] = b"MAIL FROM:<evil@attacker.example>\r\nRCPT TO:<victim@y.example>\r\nDATA\r\nFrom: <evil@attacker.example>\r\nSubject: smuggled-message\r\n\r\nsmuggled body\r\n";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn smuggling_variants_never_split_at_a_lenient_next_hop() {
    bounded(async {
        let s = Script {
            lenient_data_end: true,
            ..Script::default()
        };
        let (mta, proxy) = common::setup(s).await;
        let mut c = proxy.connect_ehlo("smuggler.example").await;
        let long_line = vec![b'L'; 9000];
        let vectors: Vec<(&str, Vec<u8>)> = vec![
            ("<CR><LF>.<CR>", b"\r\n.\r".to_vec()),
            ("<LF>.<CR>", b"\n.\r".to_vec()),
            ("<CR>.<CR>", b"\r.\r".to_vec()),
            ("<CR>.<LF>", b"\r.\n".to_vec()),
            ("<LF><LF>.<LF><LF>", b"\n\n.\n\n".to_vec()),
            ("<CR><LF>.<CR><CR><LF>", b"\r\n.\r\r\n".to_vec()),
            ("<CR><CR><LF>.<CR><CR><LF>", b"\r\r\n.\r\r\n".to_vec()),
            ("<CR><LF>.<LF><CR><LF>", b"\r\n.\n\r\n".to_vec()),
            ("<CR><LF>.<NUL><CR><LF>", b"\r\n.\0\r\n".to_vec()),
            ("<CR><LF><NUL>.<CR><LF>", b"\r\n\0.\r\n".to_vec()),
            ("<CR><LF>.<SP><CR><LF>", b"\r\n. \r\n".to_vec()),
            ("<CR><LF><SP>.<CR><LF>", b"\r\n .\r\n".to_vec()),
            ("<CR><LF>.<TAB><LF>", b"\r\n.\t\n".to_vec()),
            ("9000-octet line then <LF>.<LF>", {
                let mut v = b"\r\n".to_vec();
                v.extend_from_slice(&long_line);
                v.extend_from_slice(b"\n.\n");
                v
            }),
            ("two vectors", b"\n.\nMAIL FROM:<a@b.example>\r\n\r.\r\n".to_vec()),
            ("at the start: .<LF>", b".\n".to_vec()),
            ("at the start: .<CR>", b".\r".to_vec()),
        ];
        let mut tried = Vec::new();
        for (name, vector) in &vectors {
            for bytewise in [false, true] {
                let before = mta.messages().len();
                c.expect("MAIL FROM:<alice@x.example>", "250 2.1.0").await;
                c.expect("RCPT TO:<bob@y.example>", "250").await;
                c.expect("DATA", "354").await;
                let mut payload = if name.starts_with("at the start") {
                    Vec::new()
                } else {
                    format!("From: <alice@x.example>\r\nSubject: vector {name}\r\n\r\nfirst line")
                        .into_bytes()
                };
                let at = payload.len();
                payload.extend_from_slice(vector);
                payload.extend_from_slice(SMUGGLED);
                payload.extend_from_slice(b"\r\n.\r\n");
                if bytewise {
                    // One byte per write around the vector: the reader must not depend
                    // on how the bytes are chunked.
                    c.send_raw(&payload[..at]).await;
                    let end = (at + vector.len() + 40).min(payload.len());
                    for b in &payload[at..end] {
                        c.send_raw(std::slice::from_ref(b)).await;
                    }
                    c.send_raw(&payload[end..]).await;
                } else {
                    c.send_raw(&payload).await;
                }
                let fin = c.read_reply().await;
                assert_eq!(fin.code, 250, "{name}: end of data: {fin:?}");
                let n = c.cmd("NOOP").await;
                assert_eq!(n.code, 250, "{name}: an injected command was answered: {n:?}");
                assert!(c.pending().is_empty(), "{name}: extra replies {:?}", show(c.pending()));
                let msgs = mta.messages();
                assert_eq!(
                    msgs.len(),
                    before + 1,
                    "{name} (bytewise {bytewise}): the next hop must see exactly one more message:\n{}",
                    mta.transcripts_debug()
                );
                let m = &msgs[before];
                assert!(m.accepted);
                assert_eq!(m.rcpt_addrs(), vec!["bob@y.example".to_string()]);
                assert!(
                    contains(&m.data, b"MAIL FROM:<evil@attacker.example>")
                        && contains(&m.data, b"smuggled body"),
                    "{name}: the smuggled transaction must stay content: {:?}",
                    m.data_str()
                );
            }
            tried.push(*name);
        }
        let cmds = mta.all_commands();
        assert!(
            !cmds.iter().any(|l| l.contains("evil@attacker") || l.contains("victim@")),
            "a smuggled command reached the next hop as a command: {cmds:?}"
        );
        let mails = cmds.iter().filter(|l| l.starts_with("MAIL ")).count();
        assert_eq!(mails, vectors.len() * 2, "{cmds:?}");
        let v = next_hop_violations(&mta);
        assert!(v.is_empty(), "{}", v.join("\n"));
        assert_log_well_formed(&proxy);
        eprintln!("smuggling vectors tried (each in one write and byte by byte): {tried:?}");
    })
    .await
}

// ===========================================================================
// 2. Over-long content lines: counted, never altered
// ===========================================================================

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn long_content_lines_pass_through_intact_and_are_counted() {
    bounded(async {
        let (mta, proxy) = common::setup(Script::default()).await;
        let mut c = proxy.connect_ehlo("long.example").await;
        let mut body = simple_message("a@x.example", "b@y.example", "long-lines", "start");
        let line = |n: usize, ch: u8| {
            let mut l = vec![ch; n];
            l.extend_from_slice(b"\r\n");
            l
        };
        body.extend_from_slice(&line(998, b'a')); // the RFC 5322 maximum: not long
        body.extend_from_slice(&line(999, b'b')); // long
        body.extend_from_slice(&line(1000, b'c')); // long
        let mut big: Vec<u8> = (0..100_000u32).map(|i| b'!' + (i % 90) as u8).collect();
        big.extend_from_slice(b"\r\n");
        body.extend_from_slice(&big); // 100 KB: long
        let mut dotted = b".".to_vec();
        dotted.extend_from_slice(&line(20_000, b'd')); // long, starts with a dot
        body.extend_from_slice(&dotted);
        body.extend_from_slice(b"end\r\n");
        let fin = c.send_mail("a@x.example", &["b@y.example"], &body).await;
        assert_eq!(fin.code, 250, "{fin:?}");
        let msgs = mta.accepted();
        assert_eq!(msgs.len(), 1);
        assert!(
            msgs[0].data.ends_with(&body),
            "long lines were altered in transit"
        );
        common::assert_canonical_crlf("message at the next hop", &msgs[0].raw);
        let log = proxy.wait_log("transaction", Duration::from_secs(10)).await;
        let tx = log
            .lines()
            .find(|l| l.contains(" transaction") || l.ends_with("transaction"))
            .unwrap_or("");
        assert!(
            tx.contains("long_lines=4"),
            "the 4 lines over 998 octets must be counted in the transaction log line: {tx:?}"
        );
        assert_log_well_formed(&proxy);
    })
    .await
}

// ===========================================================================
// 3. 10,000 RCPTs in one transaction
// ===========================================================================

/// A raw pipelining client: reads replies while a task writes.
struct Raw {
    rd: BufReader<tokio::net::tcp::OwnedReadHalf>,
    wr: tokio::net::tcp::OwnedWriteHalf,
}

/// One reply (lines joined); None on EOF or reset.
async fn raw_reply(rd: &mut BufReader<tokio::net::tcp::OwnedReadHalf>) -> Option<(u16, String)> {
    let mut text = String::new();
    loop {
        let mut line = Vec::new();
        let n = tokio::time::timeout(STEP, rd.read_until(b'\n', &mut line))
            .await
            .expect("no reply within STEP")
            .unwrap_or(0);
        if n == 0 {
            return None;
        }
        let l = show(&line);
        let code: u16 = l.get(..3)?.parse().ok()?;
        text.push_str(&l);
        if l.as_bytes().get(3) != Some(&b'-') {
            return Some((code, text));
        }
    }
}

impl Raw {
    async fn connect(addr: SocketAddr) -> Raw {
        let tcp = tokio::net::TcpStream::connect(addr).await.expect("connect");
        let (r, w) = tcp.into_split();
        Raw {
            rd: BufReader::new(r),
            wr: w,
        }
    }

    async fn reply(&mut self) -> Option<(u16, String)> {
        raw_reply(&mut self.rd).await
    }

    async fn cmd(&mut self, line: &str) -> Option<(u16, String)> {
        self.wr
            .write_all(format!("{line}\r\n").as_bytes())
            .await
            .ok()?;
        self.reply().await
    }
}

/// Sends MAIL and 10,000 pipelined RCPTs (r0..r9999@y.example) in one write; returns the
/// replies to them in order (fewer if the proxy closed the session).
async fn ten_thousand_rcpts(proxy: &Proxy) -> (Raw, Vec<(u16, String)>) {
    let mut s = Raw::connect(proxy.addr).await;
    assert_eq!(s.reply().await.expect("greeting").0, 220);
    assert_eq!(s.cmd("EHLO many.example").await.expect("EHLO").0, 250);
    assert_eq!(s.cmd("MAIL FROM:<a@x.example>").await.expect("MAIL").0, 250);
    let mut batch = Vec::with_capacity(300_000);
    for i in 0..10_000 {
        batch.extend_from_slice(format!("RCPT TO:<r{i}@y.example>\r\n").as_bytes());
    }
    // Write and read at once: neither side may wait for the other's buffers.
    let Raw { mut rd, wr } = s;
    let writer = tokio::spawn(async move {
        let mut wr = wr;
        let _ = wr.write_all(&batch).await; // the proxy may close early
        wr
    });
    let mut replies = Vec::new();
    while replies.len() < 10_000 {
        match raw_reply(&mut rd).await {
            Some(r) => replies.push(r),
            None => break,
        }
    }
    let wr = writer.await.expect("writer task");
    (Raw { rd, wr }, replies)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ten_thousand_recipients_first_thousand_forwarded_rest_452() {
    bounded(async {
        // The error limits lifted: every excess RCPT is answered 452 4.5.3 and the
        // session stays usable.
        let (mta, proxy) = common::setup_with(Script::default(), |o| {
            o.limit("hard_error_limit = 100000")
                .limit("soft_error_limit = 100000")
        })
        .await;
        let (_, rss_start) = rss_kib(proxy.pid());
        let started = Instant::now();
        let (mut s, replies) = ten_thousand_rcpts(&proxy).await;
        assert_eq!(replies.len(), 10_000, "replies: {}", replies.len());
        for (i, (code, text)) in replies.iter().enumerate() {
            if i < 1000 {
                assert_eq!(*code, 250, "RCPT {i}: {text:?}");
            } else {
                assert!(*code == 452 && text.contains("4.5.3"), "RCPT {i}: {text:?}");
            }
        }
        // In sync: the next reply is DATA's.
        let (code, text) = s.cmd("DATA").await.expect("DATA");
        assert_eq!(code, 354, "{text}");
        let body = simple_message("a@x.example", "r0@y.example", "ten-thousand", "x");
        s.wr.write_all(&dot_stuff_and_terminate(&body))
            .await
            .expect("body");
        let (code, text) = s.reply().await.expect("end of data");
        assert_eq!(code, 250, "{text}");
        assert_eq!(s.cmd("NOOP").await.expect("NOOP").0, 250);
        let elapsed = started.elapsed();
        let msgs = mta.accepted();
        assert_eq!(msgs.len(), 1);
        let rcpts = msgs[0].rcpt_addrs();
        assert_eq!(rcpts.len(), 1000);
        assert_eq!(rcpts[0], "r0@y.example");
        assert_eq!(rcpts[999], "r999@y.example");
        let at_next_hop = mta
            .all_commands()
            .iter()
            .filter(|l| l.starts_with("RCPT "))
            .count();
        assert_eq!(at_next_hop, 1000, "RCPTs forwarded");
        let (peak, _) = rss_kib(proxy.pid());
        eprintln!("10,000 RCPTs: {elapsed:?}; proxy RSS {rss_start} KiB at start, peak {peak} KiB");
        assert!(
            peak.saturating_sub(rss_start) < 64 * 1024,
            "memory grew by {} KiB for 10,000 RCPTs",
            peak.saturating_sub(rss_start)
        );
        assert_log_well_formed(&proxy);

        // With the default error limits (error_sleep shortened): every reply is still
        // in order; each excess RCPT counts as an error, so the session may end with
        // 421 4.7.0 at the hard limit, but never answers out of step.
        let (mta2, proxy2) =
            common::setup_with(Script::default(), |o| o.limit("error_sleep = \"50ms\"")).await;
        let (_, replies) = ten_thousand_rcpts(&proxy2).await;
        let mut excess = 0;
        let mut closed_with_421 = false;
        for (i, (code, text)) in replies.iter().enumerate() {
            if i < 1000 {
                assert_eq!(*code, 250, "RCPT {i}: {text:?}");
            } else if *code == 452 && text.contains("4.5.3") && !closed_with_421 {
                excess += 1;
            } else if *code == 421 && text.contains("4.7.0") && !closed_with_421 {
                closed_with_421 = true;
            } else {
                panic!("reply {i} out of step: {text:?}");
            }
        }
        eprintln!(
            "10,000 RCPTs, default error limits: 1000 accepted, {excess} x 452, then {}",
            if closed_with_421 {
                "421 4.7.0 and close"
            } else {
                "the session stayed open"
            }
        );
        assert!(excess >= 1);
        assert!(closed_with_421 || excess == 9000);
        assert_eq!(
            mta2.all_commands()
                .iter()
                .filter(|l| l.starts_with("RCPT "))
                .count(),
            1000
        );
        assert_still_serving(&proxy2, "a@x.example", "b@y.example").await;
    })
    .await
}

// ===========================================================================
// 4. A 1 MB header section and 1,000-level MIME nesting
// ===========================================================================

const HOLD_POLICY: &str = r#"
[[rule]]
name = "hold-hostile"
from_domain = ["hold.example"]
action = "quarantine"
reason = "hostile input test"

[[rule]]
name = "accept-rest"
action = "accept"
"#;

fn headers_of(from: &str, subject: &str) -> String {
    format!(
        "From: <{from}>\r\nTo: <u@example.org>\r\nSubject: {subject}\r\n\
         Date: Tue, 25 Nov 2025 10:00:00 +0000\r\nMessage-ID: <{subject}@client.example>\r\n"
    )
}

/// 16,000-odd header fields, 1 MB in all.
fn many_fields(from: &str, subject: &str) -> Vec<u8> {
    let mut m = headers_of(from, subject).into_bytes();
    let filler = "f".repeat(48);
    let mut i = 0;
    while m.len() < 1_000_000 {
        m.extend_from_slice(format!("X-Filler-{i:05}: {filler}\r\n").as_bytes());
        i += 1;
    }
    m.extend_from_slice(b"\r\nbody after a 1 MB header section\r\n");
    m
}

/// One header field of 1 MB, folded over 16,000 continuation lines.
fn one_huge_field(from: &str, subject: &str) -> Vec<u8> {
    let mut m = headers_of(from, subject).into_bytes();
    m.extend_from_slice(b"X-Huge: start");
    let piece = format!("\r\n\t{}", "h".repeat(60));
    while m.len() < 1_000_000 {
        m.extend_from_slice(piece.as_bytes());
    }
    m.extend_from_slice(b"\r\n\r\nbody after one 1 MB field\r\n");
    m
}

/// `depth` multiparts, each the only part of the one above.
fn nested_multipart(from: &str, subject: &str, depth: usize) -> Vec<u8> {
    let mut m = headers_of(from, subject);
    m.push_str("MIME-Version: 1.0\r\nContent-Type: multipart/mixed; boundary=\"b0\"\r\n\r\n");
    for i in 0..depth {
        m.push_str(&format!(
            "--b{i}\r\nContent-Type: multipart/mixed; boundary=\"b{}\"\r\n\r\n",
            i + 1
        ));
    }
    m.push_str(&format!(
        "--b{depth}\r\nContent-Type: text/plain\r\n\r\nthe deepest part\r\n--b{depth}--\r\n"
    ));
    for i in (0..depth).rev() {
        m.push_str(&format!("--b{i}--\r\n"));
    }
    m.into_bytes()
}

/// `depth` messages, each the body (`message/rfc822`) of the one above.
fn nested_rfc822(from: &str, subject: &str, depth: usize) -> Vec<u8> {
    let mut m = headers_of(from, subject);
    m.push_str("MIME-Version: 1.0\r\nContent-Type: message/rfc822\r\n\r\n");
    for i in 0..depth {
        m.push_str(&format!(
            "Subject: level {i}\r\nMIME-Version: 1.0\r\nContent-Type: message/rfc822\r\n\r\n"
        ));
    }
    m.push_str("Subject: bottom\r\nContent-Type: text/plain\r\n\r\nthe deepest message\r\n");
    m.into_bytes()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn megabyte_headers_and_thousand_level_mime_get_a_clean_answer() {
    bounded(async {
        let dns = DnsServer::start(
            Zone::new()
                .txt("relay.example", "v=spf1 ip4:127.0.0.1 -all")
                .txt("hold.example", "v=spf1 ip4:127.0.0.1 -all"),
        );
        let mta = FakeMta::start(Script::default()).await;
        let dir = tempfile::tempdir().expect("tempdir");
        let policy = dir.path().join("policy.toml");
        std::fs::write(&policy, HOLD_POLICY).expect("policy");
        let token = admin_common::write_token(dir.path());
        let admin = common::free_addr();
        let mut o = ProxyOptions::smtp(mta.addr);
        o.auth = true;
        o.role = "inbound".into();
        o.local_domains = vec!["example.org".into()];
        o.dns_nameserver = Some(dns.nameserver());
        o.auth_extra = vec![format!("policy_file = {:?}", policy.to_str().unwrap())];
        o.extra_toml = vec![
            "[admin]".into(),
            "enabled = true".into(),
            format!("listen = \"{admin}\""),
            format!("token_file = {:?}", token.to_str().unwrap()),
        ];
        let proxy = Proxy::start_in(o, dir).await;

        let cases: Vec<(&str, &str, Vec<u8>)> = vec![
            (
                "16,000 header fields (1 MB)",
                "a@relay.example",
                many_fields("a@relay.example", "many-fields"),
            ),
            (
                "one 1 MB folded field",
                "a@relay.example",
                one_huge_field("a@relay.example", "huge-field"),
            ),
            (
                "1,000 nested multiparts",
                "a@relay.example",
                nested_multipart("a@relay.example", "deep-multipart", 1000),
            ),
            (
                "1,000 nested message/rfc822",
                "a@relay.example",
                nested_rfc822("a@relay.example", "deep-rfc822", 1000),
            ),
            (
                "1,000 nested multiparts, held",
                "a@hold.example",
                nested_multipart("a@hold.example", "held-multipart", 1000),
            ),
            (
                "1,000 nested message/rfc822, held",
                "a@hold.example",
                nested_rfc822("a@hold.example", "held-rfc822", 1000),
            ),
        ];
        let auth = format!("Bearer {}", admin_common::TOKEN);
        for (name, from, msg) in &cases {
            let before = mta.accepted().len();
            let mut c = proxy.connect_ehlo("mx.client.example").await;
            let started = Instant::now();
            c.expect(&format!("MAIL FROM:<{from}>"), "250").await;
            c.expect("RCPT TO:<u@example.org>", "250").await;
            let r = c.data(msg).await;
            let took = started.elapsed();
            eprintln!("{name}: {} in {took:?}", show(&r.raw).trim_end());
            assert!(
                took < Duration::from_secs(35),
                "{name}: answered after {took:?}"
            );
            assert!(
                matches!(r.code, 250 | 421..=459 | 500..=559),
                "{name}: {r:?}"
            );
            let q = c.cmd("QUIT").await;
            assert_eq!(q.code, 221, "{name}: the session stays in step");
            let queued = r
                .text()
                .strip_prefix("2.0.0 Ok: queued as ")
                .map(str::to_string);
            match queued {
                Some(id) if id.len() == 26 => {
                    // Held: the preview parses the message, in the admin API (inside the
                    // proxy) and in the CLI.
                    let t = Instant::now();
                    let e = admin_common::request(
                        admin,
                        "GET",
                        &format!("/api/quarantine/{id}"),
                        &[("Authorization", &auth)],
                        None,
                    )
                    .await;
                    eprintln!("{name}: admin entry view {} in {:?}", e.status, t.elapsed());
                    assert_eq!(e.status, 200, "{name}: {}", e.text());
                    assert!(t.elapsed() < Duration::from_secs(30));
                    let (ok, out, err) = run_bin(
                        proxy.dir.path(),
                        &[
                            "quarantine",
                            "-c",
                            proxy.config_path.to_str().unwrap(),
                            "show",
                            &id,
                        ],
                    )
                    .await;
                    assert!(ok, "{name}: quarantine show failed:\n{out}\n{err}");
                }
                _ if r.code == 250 => {
                    let msgs = mta.accepted();
                    assert_eq!(msgs.len(), before + 1, "{name}");
                    assert!(
                        msgs[before].data.ends_with(msg),
                        "{name}: relayed, but altered"
                    );
                }
                _ => assert!(
                    mta.accepted().len() == before,
                    "{name}: refused yet delivered"
                ),
            }
        }
        assert_still_serving(&proxy, "a@relay.example", "u@example.org").await;
        let v = next_hop_violations(&mta);
        assert!(v.is_empty(), "{}", v.join("\n"));
        assert_log_well_formed(&proxy);
    })
    .await
}

// ===========================================================================
// 5. Malformed DKIM signatures and keys
// ===========================================================================

mod dkim {
    use mail_auth::common::crypto::Ed25519Key;
    use mail_auth::common::headers::HeaderWriter;
    use mail_auth::dkim::{Canonicalization, DkimSigner};

    pub struct Signer {
        pkcs8: Vec<u8>,
        pub public: Vec<u8>,
    }

    impl Signer {
        pub fn new() -> Signer {
            let pkcs8 = Ed25519Key::generate_pkcs8().expect("generate an Ed25519 key");
            let public = Ed25519Key::from_pkcs8_der(&pkcs8)
                .expect("key")
                .public_key();
            Signer { pkcs8, public }
        }

        /// The `DKIM-Signature` field for `message`, unfolded (one line, CRLF-ended).
        pub fn sign(&self, domain: &str, selector: &str, message: &[u8], l: bool) -> String {
            let key = Ed25519Key::from_pkcs8_der(&self.pkcs8).expect("key");
            let sig = DkimSigner::from_key(key)
                .domain(domain)
                .selector(selector)
                .headers(["From", "To", "Subject", "Date", "Message-ID"])
                .header_canonicalization(Canonicalization::Relaxed)
                .body_canonicalization(Canonicalization::Relaxed)
                .body_length(l)
                .sign(message)
                .expect("sign");
            let h = sig.to_header();
            let unfolded = h.trim_end_matches("\r\n").replace("\r\n", "");
            format!("{unfolded}\r\n")
        }
    }

    /// Edits tag `name` of an unfolded `DKIM-Signature` field: `Some(v)` sets it (added if
    /// missing), `None` removes it. Every other byte is kept (relaxed canonicalization
    /// then sees the same field apart from the edit).
    pub fn set_tag(field: &str, name: &str, value: Option<&str>) -> String {
        let body = field
            .trim_end_matches("\r\n")
            .strip_prefix("DKIM-Signature:")
            .expect("a DKIM-Signature field");
        let mut parts: Vec<String> = body.split(';').map(str::to_string).collect();
        let pos = parts
            .iter()
            .position(|p| p.trim_start().split('=').next().map(str::trim) == Some(name));
        match (pos, value) {
            (Some(i), Some(v)) => {
                let lead: String = parts[i].chars().take_while(|c| c.is_whitespace()).collect();
                parts[i] = format!("{lead}{name}={v}");
            }
            (Some(i), None) => {
                parts.remove(i);
            }
            (None, Some(v)) => parts.insert(parts.len() - 1, format!(" {name}={v}")),
            (None, None) => {}
        }
        format!("DKIM-Signature:{}\r\n", parts.join(";"))
    }

    pub fn tag<'a>(field: &'a str, name: &str) -> Option<&'a str> {
        field
            .trim_end_matches("\r\n")
            .strip_prefix("DKIM-Signature:")?
            .split(';')
            .find_map(|p| {
                let (k, v) = p.split_once('=')?;
                (k.trim() == name).then_some(v.trim())
            })
    }
}

/// A message for the DKIM cases (From in `domain`).
fn dkim_message(domain: &str, subject: &str, body: &str) -> Vec<u8> {
    format!(
        "From: <alice@{domain}>\r\nTo: <u@example.org>\r\nSubject: {subject}\r\n\
         Date: Tue, 25 Nov 2025 10:00:00 +0000\r\nMessage-ID: <{subject}@{domain}>\r\n\r\n{body}"
    )
    .into_bytes()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn malformed_dkim_signatures_and_keys_never_pass() {
    bounded(async {
        let signer = dkim::Signer::new();
        let b64 = |b: &[u8]| base64::engine::general_purpose::STANDARD.encode(b);
        let good_key = format!("v=DKIM1; k=ed25519; p={}", b64(&signer.public));
        // dkn.example publishes p=none, dkr.example p=reject; SPF fails for both, so
        // DMARC passes only through a DKIM pass.
        let mut zone = Zone::new();
        for d in ["dkn.example", "dkr.example"] {
            let p = if d == "dkn.example" { "none" } else { "reject" };
            zone = zone
                .txt(d, "v=spf1 -all")
                .txt(&format!("_dmarc.{d}"), &format!("v=DMARC1; p={p}"))
                .txt(&format!("sel._domainkey.{d}"), &good_key)
                .txt(&format!("garbage._domainkey.{d}"), "v=DKIM1; k=ed25519; p=!!!not*base64###")
                .txt(&format!("revoked._domainkey.{d}"), "v=DKIM1; k=ed25519; p=")
                .txt(&format!("rsagarbage._domainkey.{d}"), "v=DKIM1; k=rsa; p=MIIBIjANBgkqhkiG9w0BAQEFAAOCAQ8AMIIBCgKCAQEAq")
                .txt(&format!("notdkim._domainkey.{d}"), "v=spf1 -all")
                .txt(&format!("hugekey._domainkey.{d}"), &format!("v=DKIM1; k=ed25519; p={}", "A".repeat(4000)));
        }
        let dns = DnsServer::start(zone);
        let mta = FakeMta::start(Script::default()).await;
        let mut o = ProxyOptions::smtp(mta.addr);
        o.auth = true;
        o.role = "inbound".into();
        o.local_domains = vec!["example.org".into()];
        o.dns_nameserver = Some(dns.nameserver());
        let proxy = Proxy::start(o).await;

        type Mutate = Box<dyn Fn(&str, &dkim::Signer, &str, &[u8]) -> String>;
        let edit = |tag: &'static str, v: Option<&'static str>| -> Mutate {
            Box::new(move |f: &str, _: &dkim::Signer, _: &str, _: &[u8]| dkim::set_tag(f, tag, v))
        };
        let with_selector = |sel: &'static str| -> Mutate {
            Box::new(move |_: &str, s: &dkim::Signer, d: &str, m: &[u8]| s.sign(d, sel, m, false))
        };
        let body = "Hello,\r\nthis body is signed.\r\n";
        let cases: Vec<(&str, Mutate)> = vec![
            ("valid (control)", Box::new(|f: &str, _: &dkim::Signer, _: &str, _: &[u8]| f.to_string())),
            ("b= missing", edit("b", None)),
            ("b= empty", edit("b", Some(""))),
            ("b= garbage base64", edit("b", Some("!!!not*base64@@@==="))),
            ("b= a valid base64 of 64 zero bytes", edit("b", Some("AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA=="))),
            ("b= of 100 KB", Box::new(|f: &str, _: &dkim::Signer, _: &str, _: &[u8]| dkim::set_tag(f, "b", Some(&"QUFB".repeat(25_000))))),
            ("bh= missing", edit("bh", None)),
            ("bh= garbage", edit("bh", Some("%%%garbage%%%"))),
            ("l= overflowing u64", edit("l", Some("99999999999999999999999999999"))),
            ("l= negative", edit("l", Some("-1"))),
            ("l= longer than the body (signed)", Box::new(|_: &str, s: &dkim::Signer, d: &str, m: &[u8]| {
                // Signed over a longer body with l=, then the message is sent without the tail.
                let mut longer = m.to_vec();
                longer.extend_from_slice(b"a tail the verifier never gets\r\n");
                s.sign(d, "sel", &longer, true)
            })),
            ("a=rsa-md5", edit("a", Some("rsa-md5"))),
            ("a= unknown", edit("a", Some("ed448-sha512"))),
            ("a= missing", edit("a", None)),
            ("v=2", edit("v", Some("2"))),
            ("d= missing", edit("d", None)),
            ("d= malformed", edit("d", Some("exa mple..com"))),
            ("s= path-like", edit("s", Some("../../etc/passwd"))),
            ("h= without From", edit("h", Some("Subject:Date"))),
            ("x= expired", edit("x", Some("1"))),
            ("c= unknown", edit("c", Some("bogus/bogus"))),
            ("i= outside d=", edit("i", Some("@evil.example"))),
            ("key: garbage p=", with_selector("garbage")),
            ("key: revoked (empty p=)", with_selector("revoked")),
            ("key: k=rsa with a truncated key", with_selector("rsagarbage")),
            ("key: not a DKIM record", with_selector("notdkim")),
            ("key: 4000-char p=", with_selector("hugekey")),
            ("key: NXDOMAIN", with_selector("nosuchselector")),
            ("field: no tags at all", Box::new(|_: &str, _: &dkim::Signer, _: &str, _: &[u8]| "DKIM-Signature: ;;;;==;=;\r\n".to_string())),
            ("field: non-UTF-8 bytes", Box::new(|f: &str, _: &dkim::Signer, _: &str, _: &[u8]| dkim::set_tag(f, "s", Some("selNONUTF8")))),
        ];
        let mut table = Vec::new();
        let mut problems = Vec::new();
        for (name, mutate) in &cases {
            for domain in ["dkn.example", "dkr.example"] {
                let subject = format!("dkim-{}-{}", table.len(), &domain[..3]);
                let msg = dkim_message(domain, &subject, body);
                let good = signer.sign(domain, "sel", &msg, false);
                let field = mutate(&good, &signer, domain, &msg);
                let mut full = field.clone().into_bytes();
                if let Some(at) = common::find(&full, b"NONUTF8") {
                    full.splice(at..at + 7, [0xff, 0xfe, 0xc3]);
                }
                full.extend_from_slice(&msg);
                let before = mta.accepted().len();
                let mut c = proxy.connect_ehlo("[127.0.0.1]").await;
                c.expect(&format!("MAIL FROM:<bounce@{domain}>"), "250").await;
                c.expect("RCPT TO:<u@example.org>", "250").await;
                let started = Instant::now();
                let r = c.data(&full).await;
                let took = started.elapsed();
                let _ = c.cmd("QUIT").await;
                let relayed = mta.accepted();
                let (dkim_words, dmarc) = if r.code == 250 && relayed.len() == before + 1 {
                    let ar = our_ar(&relayed[before].data).unwrap_or_default();
                    (results_of(&ar, "dkim"), results_of(&ar, "dmarc"))
                } else {
                    (vec![], vec![])
                };
                eprintln!(
                    "DKIM {name:<38} {domain}: {} dkim={dkim_words:?} dmarc={dmarc:?} ({took:?})",
                    show(&r.raw).trim_end()
                );
                if took > Duration::from_secs(35) {
                    problems.push(format!("{name} {domain}: answered after {took:?}"));
                }
                let valid = *name == "valid (control)";
                let reply = show(&r.raw).trim_end().to_string();
                match (valid, domain) {
                    (true, _) => {
                        if r.code != 250 || !dkim_words.iter().any(|w| w == "pass") {
                            problems.push(format!("{name} {domain}: {reply} dkim={dkim_words:?}"));
                        }
                    }
                    (false, "dkn.example") => {
                        // p=none: relayed, with a DKIM result that is not a pass, and
                        // (RFC 6376 6.1, RFC 8601 2.7.1) a signature that is there but
                        // cannot be used is a fail, permerror or neutral, not "none".
                        if r.code != 250 {
                            problems.push(format!("{name} {domain}: not relayed: {reply}"));
                        }
                        if dkim_words.iter().any(|w| w == "pass") || dmarc != ["fail"] {
                            problems.push(format!(
                                "{name} {domain}: PASSED: dkim={dkim_words:?} dmarc={dmarc:?}"
                            ));
                        }
                        if dkim_words.is_empty()
                            || !dkim_words
                                .iter()
                                .all(|w| matches!(w.as_str(), "fail" | "permerror" | "neutral"))
                        {
                            problems.push(format!(
                                "{name} {domain}: A-R says dkim={dkim_words:?} for a message that carries a (malformed) DKIM-Signature; expected fail/permerror/neutral"
                            ));
                        }
                    }
                    (false, _) => {
                        // p=reject: DMARC fails, the policy rejects, nothing is relayed.
                        if !(r.code == 550 && r.enhanced() == Some("5.7.1"))
                            || relayed.len() != before
                        {
                            problems.push(format!("{name} {domain}: not rejected: {reply}"));
                        }
                    }
                }
                table.push((name.to_string(), domain, dkim_words));
            }
        }
        // 50 signatures: only `dkim_max_signatures` (10) keys are looked up.
        dns.reset_queries();
        let msg = dkim_message("dkn.example", "fifty-signatures", body);
        let good = signer.sign("dkn.example", "sel", &msg, false);
        let mut full = Vec::new();
        for i in 0..50 {
            full.extend_from_slice(dkim::set_tag(&good, "s", Some(&format!("nx{i}"))).as_bytes());
        }
        full.extend_from_slice(&msg);
        let mut c = proxy.connect_ehlo("[127.0.0.1]").await;
        let r = c.send_mail("bounce@dkn.example", &["u@example.org"], &full).await;
        assert_eq!(r.code, 250, "{r:?}");
        let key_lookups = dns
            .queries()
            .iter()
            .filter(|q| q.name.contains("._domainkey."))
            .map(|q| q.name.clone())
            .collect::<std::collections::BTreeSet<_>>();
        eprintln!("50 signatures: {} distinct key names looked up", key_lookups.len());
        assert!(key_lookups.len() <= 10, "{key_lookups:?}");
        assert!(dkim::tag(&good, "bh").is_some());
        assert_log_well_formed(&proxy);
        assert!(
            problems.is_empty(),
            "{} of {} DKIM cases wrong:\n{}",
            problems.len(),
            cases.len() * 2,
            problems.join("\n")
        );
    })
    .await
}

// ===========================================================================
// 6. SPF loops and void lookups
// ===========================================================================

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn spf_loops_and_void_lookups_are_permerror_with_bounded_dns() {
    bounded(async {
        let mut zone = Zone::new()
            .txt("incl-self.example", "v=spf1 include:incl-self.example -all")
            .txt("incl-a.example", "v=spf1 include:incl-b.example -all")
            .txt("incl-b.example", "v=spf1 include:incl-a.example -all")
            .txt("redir-self.example", "v=spf1 redirect=redir-self.example")
            .txt("redir-a.example", "v=spf1 redirect=redir-b.example")
            .txt("redir-b.example", "v=spf1 redirect=redir-a.example");
        for i in 0..60 {
            zone = zone.txt(
                &format!("chain{i}.example"),
                &format!("v=spf1 include:chain{}.example -all", i + 1),
            );
        }
        let voids: Vec<String> = (0..50).map(|i| format!("a:{i}.nx.example")).collect();
        zone = zone.txt(
            "void50.example",
            &format!("v=spf1 {} -all", voids.join(" ")),
        );
        let exists: Vec<String> = (0..50)
            .map(|i| format!("exists:%{{i}}.{i}.nx.example"))
            .collect();
        zone = zone.txt(
            "exists50.example",
            &format!("v=spf1 {} -all", exists.join(" ")),
        );
        for i in 0..50 {
            zone = zone.txt(
                &format!("vc{i}.example"),
                &format!("v=spf1 a:vc{i}.nx.example include:vc{}.example -all", i + 1),
            );
        }
        zone = zone.txt("mx20.example", "v=spf1 mx -all");
        for i in 0..20 {
            zone = zone.mx("mx20.example", 10, &format!("mx{i}.nomx.example"));
        }
        let dns = DnsServer::start(zone);
        let mta = FakeMta::start(Script::default()).await;
        let mut o = ProxyOptions::smtp(mta.addr);
        o.auth = true;
        o.role = "inbound".into();
        o.local_domains = vec!["example.org".into()];
        o.dns_nameserver = Some(dns.nameserver());
        let proxy = Proxy::start(o).await;

        let cases = [
            ("include loop (itself)", "incl-self.example"),
            ("include loop (a <-> b)", "incl-a.example"),
            ("redirect loop (itself)", "redir-self.example"),
            ("redirect loop (a <-> b)", "redir-a.example"),
            ("60 chained includes", "chain0.example"),
            ("50 void a: lookups", "void50.example"),
            ("50 void exists: lookups", "exists50.example"),
            ("50 chained includes with a void each", "vc0.example"),
            ("mx with 20 names, none resolving", "mx20.example"),
        ];
        for (name, domain) in cases {
            dns.reset_queries();
            let before = mta.accepted().len();
            let mut c = proxy.connect_ehlo("[127.0.0.1]").await;
            let started = Instant::now();
            let msg = dkim_message(domain, "spf-case", "spf\r\n");
            let r = c
                .send_mail(&format!("x@{domain}"), &["u@example.org"], &msg)
                .await;
            let took = started.elapsed();
            let _ = c.cmd("QUIT").await;
            let queries = dns.queries();
            let spf: std::collections::BTreeSet<(String, String)> = queries
                .iter()
                .filter(|q| !q.name.starts_with("_dmarc."))
                .map(|q| (q.name.clone(), q.rtype.to_string()))
                .collect();
            let relayed = mta.accepted();
            let words = if r.code == 250 && relayed.len() == before + 1 {
                results_of(&our_ar(&relayed[before].data).unwrap_or_default(), "spf")
            } else {
                vec![]
            };
            eprintln!(
                "SPF {name:<40}: {} spf={words:?}, {} queries ({} distinct, non-DMARC) in {took:?}",
                show(&r.raw).trim_end(),
                queries.len(),
                spf.len()
            );
            assert_eq!(r.code, 250, "{name}: {r:?}");
            assert_eq!(
                words.first().map(String::as_str),
                Some("permerror"),
                "{name}: {words:?}"
            );
            // RFC 7208 4.6.4: the record itself, at most 10 DNS-querying terms and 2
            // void lookups (an MX term: its MX query and at most 10 address lookups).
            assert!(spf.len() <= 13, "{name}: {} lookups: {spf:?}", spf.len());
            assert!(took < Duration::from_secs(10), "{name}: {took:?}");
        }
        assert_log_well_formed(&proxy);
    })
    .await
}

// ===========================================================================
// 7. SMTPUTF8
// ===========================================================================

/// MAIL, RCPT, then DATA if both were accepted; every reply in order.
async fn utf8_transaction(c: &mut Client, mail: &[u8], rcpt: &[u8], msg: &[u8]) -> Vec<Reply> {
    let mut replies = Vec::new();
    for line in [mail, rcpt] {
        c.send_raw(line).await;
        replies.push(c.read_reply().await);
    }
    if replies.iter().all(|r| r.code / 100 == 2) {
        let d = c.cmd("DATA").await;
        let go = d.code == 354;
        replies.push(d);
        if go {
            c.send_raw(&dot_stuff_and_terminate(msg)).await;
            replies.push(c.read_reply().await);
        }
    }
    let r = c.cmd("RSET").await;
    assert_eq!(r.code, 250, "RSET after the transaction: {r:?}");
    replies
}

fn codes(replies: &[Reply]) -> Vec<String> {
    replies
        .iter()
        .map(|r| show(&r.raw).trim_end().to_string())
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn smtputf8_relayed_only_to_a_next_hop_that_offers_it() {
    bounded(async {
        let msg = "From: <\u{fc}ser@ex\u{e4}mple.org>\r\nTo: <\u{f1}o\u{eb}l@example.org>\r\nSubject: gr\u{fc}\u{df}e \u{2603}\r\n\r\nUTF-8 body \u{e9}\r\n"
            .as_bytes()
            .to_vec();
        let mail_utf8 = "MAIL FROM:<\u{fc}ser@ex\u{e4}mple.org> SMTPUTF8\r\n".as_bytes();
        let mail_no_param = "MAIL FROM:<\u{fc}ser@ex\u{e4}mple.org>\r\n".as_bytes();
        let rcpt = "RCPT TO:<\u{f1}o\u{eb}l@example.org>\r\n".as_bytes();
        let mut problems = Vec::new();

        // A next hop that offers SMTPUTF8: relayed with SMTPUTF8, addresses unchanged.
        let (mta, proxy) = common::setup(Script::default()).await;
        let mut c = proxy.connect().await;
        assert_eq!(c.read_reply().await.code, 220);
        let e = c.ehlo("utf8.example").await;
        assert!(e.has_ext("SMTPUTF8"), "{e:?}");
        let replies = utf8_transaction(&mut c, mail_utf8, rcpt, &msg).await;
        eprintln!("SMTPUTF8 to an SMTPUTF8 next hop: {:?}", codes(&replies));
        match replies.last() {
            Some(r) if replies.len() == 4 && r.code == 250 => {
                let m = &mta.accepted()[0];
                assert_eq!(m.sender(), "\u{fc}ser@ex\u{e4}mple.org");
                assert_eq!(m.rcpt_addrs(), vec!["\u{f1}o\u{eb}l@example.org".to_string()]);
                assert!(
                    m.mail_params().iter().any(|p| p == "SMTPUTF8"),
                    "SMTPUTF8 not passed on: {:?}",
                    m.mail
                );
                assert!(m.data.ends_with(&msg));
            }
            _ => problems.push(format!("not relayed to an SMTPUTF8 next hop: {:?}", codes(&replies))),
        }
        // Non-ASCII without the SMTPUTF8 parameter: refused (RFC 6531 3.7.4.1: 553 5.6.7).
        let replies = utf8_transaction(&mut c, mail_no_param, rcpt, &msg).await;
        eprintln!("non-ASCII MAIL without SMTPUTF8: {:?}", codes(&replies));
        if !replies.iter().any(|r| r.code >= 400) {
            problems.push(format!(
                "a non-ASCII address without SMTPUTF8 was accepted: {:?}",
                codes(&replies)
            ));
        }
        let _ = c.cmd("QUIT").await;
        for v in next_hop_violations(&mta) {
            problems.push(format!("SMTPUTF8 next hop: {v}"));
        }
        if mta.accepted().len() > 1 {
            problems.push("the message without SMTPUTF8 was delivered".into());
        }

        // A next hop without SMTPUTF8: refused cleanly, nothing non-ASCII sent there.
        let (mta, proxy) = common::setup(Script::default().without_cap("SMTPUTF8")).await;
        let mut c = proxy.connect_ehlo("utf8.example").await;
        let replies = utf8_transaction(&mut c, mail_utf8, rcpt, &msg).await;
        eprintln!("SMTPUTF8 to a next hop without it: {:?}", codes(&replies));
        if !replies.iter().any(|r| r.code >= 400) {
            problems.push(format!(
                "SMTPUTF8 mail was accepted for a next hop without SMTPUTF8: {:?}",
                codes(&replies)
            ));
        }
        // Plain ASCII still goes through (the next hop is not broken).
        let r = c
            .send_mail("a@x.example", &["b@y.example"], &simple_message("a@x.example", "b@y.example", "ascii", "x"))
            .await;
        assert_eq!(r.code, 250, "{r:?}");
        let _ = c.cmd("QUIT").await;
        for v in next_hop_violations(&mta) {
            problems.push(format!("non-SMTPUTF8 next hop: {v}"));
        }
        if mta.accepted().len() != 1 {
            problems.push(format!(
                "{} messages delivered to the non-SMTPUTF8 next hop (only the ASCII one may be)",
                mta.accepted().len()
            ));
        }
        assert_log_well_formed(&proxy);
        assert!(problems.is_empty(), "{}", problems.join("\n"));
    })
    .await
}

// ===========================================================================
// 8. Invalid UTF-8 in commands
// ===========================================================================

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn invalid_utf8_in_commands_is_refused() {
    bounded(async {
        let (mta, proxy) =
            common::setup_with(Script::default(), |o| o.limit("hard_error_limit = 1000")).await;
        let mut c = proxy.connect().await;
        assert_eq!(c.read_reply().await.code, 220);
        // (what, command, state needed: "" none, "helo", "mail")
        let cases: Vec<(&str, &[u8], &str)> = vec![
            ("EHLO", b"EHLO \xff\xfe.example\r\n", ""),
            ("HELO", b"HELO \xc3\x28.example\r\n", ""),
            ("MAIL path", b"MAIL FROM:<\xff@x.example>\r\n", "helo"),
            (
                "MAIL path, SMTPUTF8",
                b"MAIL FROM:<\xc3@x.example> SMTPUTF8\r\n",
                "helo",
            ),
            (
                "MAIL ENVID",
                b"MAIL FROM:<a@x.example> ENVID=\xff\xfe\r\n",
                "helo",
            ),
            ("RCPT path", b"RCPT TO:<\xfe@y.example>\r\n", "mail"),
            (
                "RCPT ORCPT",
                b"RCPT TO:<b@y.example> ORCPT=rfc822;\xff@y.example\r\n",
                "mail",
            ),
            ("VRFY", b"VRFY \xff\r\n", "helo"),
        ];
        let mut problems = Vec::new();
        let mut state = "";
        for (what, cmd, needs) in &cases {
            // Bring the session into the state the command needs.
            if state == "mail" && *needs != "mail" {
                c.expect("RSET", "250").await;
                state = "helo";
            }
            if !needs.is_empty() && state.is_empty() {
                c.ehlo("good.example").await;
                state = "helo";
            }
            if *needs == "mail" && state != "mail" {
                c.expect("MAIL FROM:<a@x.example>", "250").await;
                state = "mail";
            }
            c.send_raw(cmd).await;
            let r = c.read_reply().await;
            eprintln!("invalid UTF-8 in {what}: {}", show(&r.raw).trim_end());
            if !matches!(r.code, 500 | 501) {
                problems.push(format!(
                    "{what}: {:?} answered {}",
                    show(cmd),
                    show(&r.raw).trim_end()
                ));
            }
            if r.code / 100 == 2 {
                match &what[..4] {
                    "EHLO" | "HELO" => state = "helo",
                    "MAIL" => {
                        // MAIL reaches the next hop with the first RCPT.
                        let r = c.cmd("RCPT TO:<b@y.example>").await;
                        eprintln!("  then RCPT: {}", show(&r.raw).trim_end());
                        state = "mail";
                    }
                    _ => {}
                }
            }
        }
        // Whatever was accepted: a transaction, and the next hop must never see the bytes.
        if state == "mail" {
            c.expect("RSET", "250").await;
        }
        c.ehlo("good.example").await;
        let r = c
            .send_mail(
                "a@x.example",
                &["b@y.example"],
                &simple_message("a@x.example", "b@y.example", "after-utf8", "x"),
            )
            .await;
        assert_eq!(r.code, 250, "{r:?}");
        let _ = c.cmd("QUIT").await;
        for v in next_hop_violations(&mta) {
            problems.push(format!("next hop: {v}"));
        }
        assert_log_well_formed(&proxy);
        assert!(problems.is_empty(), "{}", problems.join("\n"));
    })
    .await
}

// ===========================================================================
// 9. CR / LF / NUL injection into everything that reaches the next hop or a log line
// ===========================================================================

/// A login whose name tries to start a forged log line.
const EVIL_USER: &str =
    "evil\r\n2001-01-01T00:00:00.000000Z  INFO authenticated forged=yes user=root";
const EVIL_PASS: &str = "pw-evil-1";

fn b64(s: &[u8]) -> String {
    base64::engine::general_purpose::STANDARD.encode(s)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn crlf_and_nul_injection_in_every_parameter_stays_out_of_commands_and_logs() {
    bounded(async {
        let mta = FakeMta::start(Script::default().with_auth()).await;
        mta.set_auth_users(&[(EVIL_USER, EVIL_PASS)]);
        let mut o = ProxyOptions::smtp(mta.addr);
        o.starttls = true;
        o.limits = vec!["hard_error_limit = 1000".into()];
        let proxy = Proxy::start(o).await;
        let mut problems: Vec<String> = Vec::new();
        let mut tried: Vec<String> = Vec::new();

        // Session A, plain: EHLO, MAIL and RCPT with every parameter poisoned.
        let mut c = proxy.connect().await;
        assert_eq!(c.read_reply().await.code, 220);
        // (parameter, raw line(s), replies expected, the session is in a transaction after)
        let cases: Vec<(&str, &[u8], usize)> = vec![
            (
                "EHLO name + CR",
                b"EHLO evil.example\rXCLIENT ADDR=6.6.6.6\r\n",
                1,
            ),
            (
                "EHLO name + NUL",
                b"EHLO evil.example\0XCLIENT ADDR=6.6.6.6\r\n",
                1,
            ),
            (
                "EHLO name + LF (two lines)",
                b"EHLO evil.example\nXCLIENT ADDR=6.6.6.6 LOGIN=admin\r\n",
                2,
            ),
            ("EHLO name + TAB", b"EHLO evil\texample\r\n", 1),
            (
                "EHLO name with + = and 8-bit",
                "EHLO we+ird=n\u{e4}me.example\r\n".as_bytes(),
                1,
            ),
            ("MAIL path + CR", b"MAIL FROM:<a\r@x.example>\r\n", 1),
            ("MAIL path + NUL", b"MAIL FROM:<a\0@x.example>\r\n", 1),
            (
                "MAIL quoted local part + CR",
                b"MAIL FROM:<\"a\rb\"@x.example>\r\n",
                1,
            ),
            (
                "MAIL ENVID + CR",
                b"MAIL FROM:<a@x.example> ENVID=abc\rdef\r\n",
                1,
            ),
            (
                "MAIL SIZE + CR",
                b"MAIL FROM:<a@x.example> SIZE=100\r0\r\n",
                1,
            ),
            (
                "MAIL SIZE + NUL",
                b"MAIL FROM:<a@x.example> SIZE=100\0\r\n",
                1,
            ),
            (
                "MAIL BODY + NUL",
                b"MAIL FROM:<a@x.example> BODY=8BITMIME\0\r\n",
                1,
            ),
        ];
        for (what, line, n) in &cases {
            c.send_raw(line).await;
            let mut got = Vec::new();
            for _ in 0..*n {
                got.push(show(&c.read_reply().await.raw).trim_end().to_string());
            }
            let has_raw_ctl = line[..line.len() - 2]
                .iter()
                .enumerate()
                .any(|(i, &b)| b == 0 || (b == b'\r' && line.get(i + 1) != Some(&b'\n')));
            if has_raw_ctl && !got[0].starts_with("501") {
                problems.push(format!(
                    "{what}: {:?} answered {got:?} (expected 501)",
                    show(line)
                ));
            }
            // Leave no transaction open; greet again after each EHLO case.
            let r = c.cmd("RSET").await;
            assert_eq!(r.code, 250, "{what}: RSET: {r:?}");
            tried.push(format!("{what} -> {got:?}"));
            if what.starts_with("EHLO") {
                c.ehlo("good.example").await;
            }
        }
        // Parameters that are accepted in an encoded form: the next hop must get them
        // re-encoded (xtext), never decoded into its command stream.
        c.ehlo("good.example").await;
        let accepted_cases: Vec<(&str, &[u8])> = vec![
            (
                "MAIL ENVID xtext CR LF",
                b"MAIL FROM:<a@x.example> RET=HDRS ENVID=abc+0D+0ARCPT+20TO:<v@remote.example>\r\n",
            ),
            (
                "RCPT ORCPT xtext CR LF",
                b"RCPT TO:<b@y.example> ORCPT=rfc822;b+0D+0AMAIL+20FROM:<x@evil.example>\r\n",
            ),
            ("RCPT path + CR", b"RCPT TO:<v\r@y.example>\r\n"),
            ("RCPT path + NUL", b"RCPT TO:<v@y.example\0>\r\n"),
            (
                "RCPT ORCPT + CR",
                b"RCPT TO:<c@y.example> ORCPT=rfc822;c\rx@y.example\r\n",
            ),
            (
                "RCPT NOTIFY + CR",
                b"RCPT TO:<d@y.example> NOTIFY=SUCCESS\rFAILURE\r\n",
            ),
            (
                "RCPT NOTIFY xtext CR LF",
                b"RCPT TO:<e@y.example> NOTIFY=SUCCESS+0D+0ARSET\r\n",
            ),
            (
                "RCPT quoted local part with '>' and parameters",
                b"RCPT TO:<\"v@remote.example> NOTIFY=NEVER\"@y.example>\r\n",
            ),
            (
                "RCPT quoted local part with a space",
                b"RCPT TO:<\"f g\"@y.example>\r\n",
            ),
        ];
        for (what, line) in &accepted_cases {
            c.send_raw(line).await;
            let r = c.read_reply().await;
            let got = show(&r.raw).trim_end().to_string();
            let has_raw_ctl = line[..line.len() - 2]
                .iter()
                .enumerate()
                .any(|(i, &b)| b == 0 || (b == b'\r' && line.get(i + 1) != Some(&b'\n')));
            if has_raw_ctl && r.code != 501 {
                problems.push(format!(
                    "{what}: {:?} answered {got:?} (expected 501)",
                    show(line)
                ));
            }
            tried.push(format!("{what} -> {got}"));
        }
        let d = c.cmd("DATA").await;
        if d.code == 354 {
            c.send_raw(&dot_stuff_and_terminate(&simple_message(
                "a@x.example",
                "b@y.example",
                "inj-a",
                "x",
            )))
            .await;
            let fin = c.read_reply().await;
            assert_eq!(fin.code, 250, "{fin:?}");
        }
        // A quoted local part carrying '>' in MAIL.
        c.send_raw(b"MAIL FROM:<\"a> SIZE=1 RET=FULL\"@x.example>\r\n")
            .await;
        let r = c.read_reply().await;
        tried.push(format!(
            "MAIL quoted local part with '>' and parameters -> {}",
            show(&r.raw).trim_end()
        ));
        if r.code == 250 {
            let r2 = c.cmd("RCPT TO:<b@y.example>").await;
            tried.push(format!("  then RCPT -> {}", show(&r2.raw).trim_end()));
        }
        c.expect("RSET", "250").await;
        let _ = c.cmd("QUIT").await;

        // Session B, TLS: AUTH PLAIN with a login name carrying CRLF and a forged log
        // line; then a new EHLO name forces a new next-hop connection, which carries
        // the login as XCLIENT LOGIN=.
        let mut c = proxy.connect_ehlo("client.example").await;
        c.starttls().await;
        c.ehlo("client.example").await;
        let blob = [
            b"\0".as_slice(),
            EVIL_USER.as_bytes(),
            b"\0",
            EVIL_PASS.as_bytes(),
        ]
        .concat();
        let r = c.cmd(&format!("AUTH PLAIN {}", b64(&blob))).await;
        tried.push(format!(
            "AUTH PLAIN user with CRLF + forged log line -> {}",
            show(&r.raw).trim_end()
        ));
        assert_eq!(r.code, 235, "the next hop accepts this login: {r:?}");
        c.ehlo("other-name.example").await;
        let fin = c
            .send_mail(
                "a@x.example",
                &["b@y.example"],
                &simple_message("a@x.example", "b@y.example", "inj-b", "x"),
            )
            .await;
        assert_eq!(fin.code, 250, "{fin:?}");
        let _ = c.cmd("QUIT").await;
        let logins: Vec<String> = mta
            .conns()
            .iter()
            .filter_map(|c| c.xclient_attr("LOGIN"))
            .collect();
        eprintln!("XCLIENT LOGIN values at the next hop: {logins:?}");
        if logins.is_empty() {
            problems.push("no XCLIENT LOGIN reached the next hop after AUTH + new EHLO".into());
        }

        // Session C, TLS: AUTH LOGIN with LF and NUL in the name, wrong password (535).
        let mut c = proxy.connect_ehlo("client.example").await;
        c.starttls().await;
        c.ehlo("client.example").await;
        let user = b"evil2\n2001-01-01T00:00:00.000000Z  WARN forged=yes\0nul";
        let r = c.cmd(&format!("AUTH LOGIN {}", b64(user))).await;
        assert_eq!(r.code, 334, "{r:?}");
        let r = c.cmd(&b64(b"wrong-password")).await;
        tried.push(format!(
            "AUTH LOGIN user with LF, NUL + forged log line -> {}",
            show(&r.raw).trim_end()
        ));
        let _ = c.cmd("QUIT").await;

        // Session D: a long EHLO name full of characters xtext must encode.
        let mut c = proxy.connect().await;
        assert_eq!(c.read_reply().await.code, 220);
        let long_helo = format!("we+ird={}", "x=y+z.".repeat(40));
        let r = c.cmd(&format!("EHLO {long_helo}")).await;
        tried.push(format!(
            "EHLO of {} octets with + and = -> {}",
            long_helo.len(),
            r.code
        ));
        if r.code == 250 {
            let fin = c
                .send_mail(
                    "a@x.example",
                    &["b@y.example"],
                    &simple_message("a@x.example", "b@y.example", "inj-d", "x"),
                )
                .await;
            assert_eq!(fin.code, 250, "{fin:?}");
        }
        let _ = c.cmd("QUIT").await;

        for t in &tried {
            eprintln!("injection: {t}");
        }
        for v in next_hop_violations(&mta) {
            problems.push(format!("next hop: {v}"));
        }
        // Give the last log lines a moment, then check every line is one event.
        tokio::time::sleep(Duration::from_millis(200)).await;
        for v in log_violations(&proxy.log()) {
            problems.push(format!("log: {v}"));
        }
        assert!(
            problems.is_empty(),
            "{} injection problems:\n{}\n--- next hop ---\n{}",
            problems.len(),
            problems.join("\n"),
            mta.transcripts_debug()
        );
    })
    .await
}

// ===========================================================================
// 10. Slowloris
// ===========================================================================

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn slowloris_sessions_are_cut_count_against_the_client_limit_and_starve_no_one() {
    bounded(async {
        const SLOW: usize = 50;
        const PER_CLIENT: usize = 40;
        const NORMAL: usize = 20;
        /// Longest a trickling session may live after its last complete line: the 3 s
        /// timeout as a deadline for the whole command (or content line), plus slack.
        const CUT_BY: Duration = Duration::from_secs(6);
        /// How long a slow client keeps trickling before giving up on being cut.
        const GIVE_UP: Duration = Duration::from_secs(12);
        let (mta, proxy) = common::setup_with(Script::default(), |mut o| {
            o.max_sessions_per_client = Some(PER_CLIENT as u32);
            o.limit("command_timeout = \"3s\"")
                .limit("data_timeout = \"3s\"")
        })
        .await;
        let addr = proxy.addr;

        // 50 slow clients from 127.0.0.1: the first 40 are admitted; half trickle a
        // command, half trickle message content, one byte a second (under the 3 s
        // timeout, so only a deadline per command or a minimum data rate cuts them).
        let (admitted_tx, mut admitted_rx) = tokio::sync::mpsc::channel::<bool>(SLOW);
        let mut slow = Vec::new();
        for i in 0..SLOW {
            let admitted_tx = admitted_tx.clone();
            slow.push(tokio::spawn(async move {
                let mut c = Client::connect(addr).await;
                let g = c.read_reply().await;
                if g.code != 220 {
                    let _ = admitted_tx.send(false).await;
                    return (false, show(&g.raw).trim_end().to_string(), None);
                }
                let _ = admitted_tx.send(true).await;
                c.ehlo(&format!("slow{i}.example")).await;
                let in_data = i % 2 == 1;
                if in_data {
                    c.expect("MAIL FROM:<slow@x.example>", "250").await;
                    c.expect("RCPT TO:<b@y.example>", "250").await;
                    c.expect("DATA", "354").await;
                }
                let start = Instant::now();
                let trickle: &[u8] = if in_data { b"Subject: slow" } else { b"NOOP slowly" };
                let mut k = 0;
                loop {
                    if start.elapsed() > GIVE_UP {
                        return (true, "never cut".to_string(), None);
                    }
                    let b = trickle[k % trickle.len()];
                    k += 1;
                    if c.try_send_raw(&[b]).await.is_err() {
                        return (true, "reset".to_string(), Some(start.elapsed()));
                    }
                    match tokio::time::timeout(Duration::from_secs(1), c.try_read_reply()).await {
                        Ok(Some(r)) => {
                            return (true, show(&r.raw).trim_end().to_string(), Some(start.elapsed()));
                        }
                        Ok(None) => return (true, "closed".to_string(), Some(start.elapsed())),
                        Err(_) => {}
                    }
                }
            }));
        }
        drop(admitted_tx);
        let mut admitted = 0;
        let mut refused = 0;
        while let Some(a) = admitted_rx.recv().await {
            if a {
                admitted += 1;
            } else {
                refused += 1;
            }
        }

        // 20 normal sessions from another client (127.0.0.2), all at once, while the
        // slow ones trickle.
        tokio::time::sleep(Duration::from_millis(500)).await;
        let mut normal = Vec::new();
        for i in 0..NORMAL {
            normal.push(tokio::spawn(async move {
                let started = Instant::now();
                let mut c = connect_from("127.0.0.2", addr).await;
                assert_eq!(c.read_reply().await.code, 220);
                c.ehlo(&format!("normal{i}.example")).await;
                let body = simple_message("n@x.example", "b@y.example", &format!("normal-{i}"), "x");
                let r = c.send_mail("n@x.example", &["b@y.example"], &body).await;
                let _ = c.cmd("QUIT").await;
                (r.code, started.elapsed())
            }));
        }
        let mut worst = Duration::ZERO;
        for n in normal {
            let (code, took) = n.await.expect("normal session");
            assert_eq!(code, 250, "a normal session failed next to the slow ones");
            worst = worst.max(took);
        }

        let mut outcomes = Vec::new();
        for s in slow {
            outcomes.push(s.await.expect("slow session"));
        }
        let refusals: Vec<&String> = outcomes.iter().filter(|o| !o.0).map(|o| &o.1).collect();
        let cuts: Vec<(&String, Option<Duration>)> =
            outcomes.iter().filter(|o| o.0).map(|o| (&o.1, o.2)).collect();
        let mut summary = BTreeMap::new();
        for (what, _) in &cuts {
            *summary.entry(what.as_str()).or_insert(0) += 1;
        }
        let latest = cuts.iter().filter_map(|c| c.1).max();
        eprintln!(
            "slowloris: {admitted} admitted, {refused} refused ({:?}); outcomes {summary:?}, latest cut after {latest:?}; {NORMAL} normal sessions, slowest {worst:?}",
            refusals.first()
        );
        assert_eq!(admitted, PER_CLIENT, "slow sessions admitted");
        assert_eq!(refused, SLOW - PER_CLIENT);
        assert!(
            refusals.iter().all(|r| r.starts_with("421 4.7.0")),
            "{refusals:?}"
        );
        assert!(worst < Duration::from_secs(5), "normal sessions starved: slowest {worst:?}");
        let mut problems = Vec::new();
        for (i, (what, after)) in cuts.iter().enumerate() {
            let ok = what.starts_with("421") && after.is_some_and(|a| a <= CUT_BY);
            if !ok {
                problems.push(format!("slow session {i}: {what} after {after:?}"));
            }
        }
        assert!(
            mta.accepted().iter().all(|m| !m.data_str().contains("Subject: slow")),
            "a trickled message was delivered"
        );
        assert_log_well_formed(&proxy);
        assert!(
            problems.is_empty(),
            "{} of {admitted} sessions trickling one byte a second (command_timeout = data_timeout = 3s) were not cut with 421 within {CUT_BY:?}:\n{}",
            problems.len(),
            problems.join("\n")
        );
    })
    .await
}
