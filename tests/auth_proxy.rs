//! Sender authentication through the real proxy (docs-contract/CONTRACT-auth.md): every
//! test starts `mailwarden run` with `[auth] enabled = true` on an inbound listener for
//! `example.org`, the loopback DNS server of tests/common/dns.rs as its only resolver and
//! a fake next hop that speaks XCLIENT; a real SMTP client connects from 127.0.0.1.
//!
//! Alignment comes from SPF alone (`sender.example` authorises 127.0.0.1 and publishes
//! `p=reject`), so nothing is signed. What is asserted: the exact SMTP replies, what the
//! next hop received (the one `Authentication-Results` at the top, forged ones gone, the
//! rest byte for byte), the quarantine entries on disk, the log lines of shadow rules and
//! reloads, and that `mailwarden check --json` agrees with the live proxy.

mod common;

use std::ffi::OsString;
use std::path::{Path, PathBuf};
use std::process::{Command, ExitStatus};
use std::time::{Duration, Instant};

use common::dns::{DnsServer, Zone};
use common::fake_mta::{FakeMta, Message, Script, angle_addr};
use common::smtp_client::{Client, Reply, assert_reply};
use common::{Proxy, ProxyOptions, assert_next_hop_canonical, bin, bounded, show};

/// The proxy's host name (the harness default), hence our authserv-id.
const AUTHSERV_ID: &str = "mailwarden.test";
/// EHLO name of the test client: not in the zone (NXDOMAIN), so SPF for HELO is `none`.
const HELO: &str = "mx.client.example";
const RCPT: &str = "user@example.org";
/// Upper bound for one run of the binary (`check`, `check-config`, a failing `run`).
const BIN_DEADLINE: Duration = Duration::from_secs(60);

/// Every domain the tests send from.
fn zone() -> Zone {
    Zone::new()
        // aligned through SPF, DMARC p=reject
        .txt("sender.example", "v=spf1 ip4:127.0.0.1 -all")
        .txt("_dmarc.sender.example", "v=DMARC1; p=reject")
        // SPF fails for 127.0.0.1: DMARC fail with each policy
        .txt("spoof.example", "v=spf1 -all")
        .txt("_dmarc.spoof.example", "v=DMARC1; p=reject")
        .txt("quar.example", "v=spf1 -all")
        .txt("_dmarc.quar.example", "v=DMARC1; p=quarantine")
        .txt("lax.example", "v=spf1 -all")
        .txt("_dmarc.lax.example", "v=DMARC1; p=none")
        // SPF passes, no DMARC record (DMARC none)
        .txt("freemail.example", "v=spf1 ip4:127.0.0.1 -all")
        .txt("examp1e.org", "v=spf1 ip4:127.0.0.1 -all")
        .txt("exarnple.org", "v=spf1 ip4:127.0.0.1 -all")
        .txt("xn--xample-9ua.org", "v=spf1 ip4:127.0.0.1 -all")
        .txt("example.org.evil.example", "v=spf1 ip4:127.0.0.1 -all")
}

/// Proxy options for the authentication tests.
fn auth_options(mta: &FakeMta, dns: &DnsServer) -> ProxyOptions {
    let mut o = ProxyOptions::smtp(mta.addr);
    o.auth = true;
    o.role = "inbound".into();
    o.local_domains = vec!["example.org".into()];
    o.dns_nameserver = Some(dns.nameserver());
    o.xclient = "require".into();
    o
}

struct Env {
    dns: DnsServer,
    mta: FakeMta,
    proxy: Proxy,
}

/// DNS (with [`zone`]), fake next hop, proxy (options adjusted by `f`) in `dir`.
async fn start_in(dir: tempfile::TempDir, f: impl FnOnce(ProxyOptions) -> ProxyOptions) -> Env {
    let dns = DnsServer::start(zone());
    let mta = FakeMta::start(Script::default()).await;
    let proxy = Proxy::start_in(f(auth_options(&mta, &dns)), dir).await;
    Env { dns, mta, proxy }
}

async fn start(f: impl FnOnce(ProxyOptions) -> ProxyOptions) -> Env {
    start_in(tempfile::tempdir().expect("tempdir"), f).await
}

const BODY: &str = "Hello,\r\n\r\n.a line that starts with a dot\r\nAuthentication-Results: mailwarden.test; dmarc=pass (in the body: content)\r\n\r\n-- \r\nBob\r\n";

/// A message with `from` as the whole From: value, `extra` header lines (each ending in
/// CRLF) put first, and [`BODY`].
fn message(from: &str, subject: &str, extra: &str) -> Vec<u8> {
    format!(
        "{extra}From: {from}\r\nTo: <{RCPT}>\r\nSubject: {subject}\r\nDate: Tue, 25 Nov 2025 10:00:00 +0000\r\nMessage-ID: <{subject}@client.example>\r\nMIME-Version: 1.0\r\nContent-Type: text/plain; charset=us-ascii\r\n\r\n{BODY}"
    )
    .into_bytes()
}

/// EHLO, MAIL, RCPT (both must succeed), DATA + message; returns the end-of-data reply.
async fn transaction(c: &mut Client, mail_from: &str, msg: &[u8]) -> Reply {
    let r = c.cmd(&format!("MAIL FROM:<{mail_from}>")).await;
    assert_reply(&r, "250 2.1.0", &format!("MAIL FROM:<{mail_from}>"));
    let r = c.cmd(&format!("RCPT TO:<{RCPT}>")).await;
    assert_reply(
        &r,
        "250 2.1.5",
        "RCPT TO (passed through from the next hop)",
    );
    c.data(msg).await
}

/// One session: greeting, EHLO, one transaction, QUIT. Returns the end-of-data reply.
async fn deliver(proxy: &Proxy, mail_from: &str, msg: &[u8]) -> Reply {
    let mut c = proxy.connect_ehlo(HELO).await;
    assert_eq!(
        c.local_addr().ip().to_string(),
        "127.0.0.1",
        "the client must connect from 127.0.0.1 (SPF depends on it)"
    );
    let reply = transaction(&mut c, mail_from, msg).await;
    let q = c.cmd("QUIT").await;
    assert_reply(&q, "221 2.0.0", "QUIT");
    reply
}

// ---------------------------------------------------------------------------
// Header helpers (independent of the implementation's parser)
// ---------------------------------------------------------------------------

#[derive(Debug, Clone)]
struct Hdr {
    name: String,
    /// The field as on the wire, continuation lines and final CRLF included.
    raw: String,
    /// Unfolded value (CRLFs removed, RFC 5322 2.2.3), trimmed.
    value: String,
}

/// Header fields of `data` and the offset of the body (after the empty line).
fn header_fields(data: &[u8]) -> (Vec<Hdr>, usize) {
    let text = show(data);
    let mut out: Vec<Hdr> = Vec::new();
    let mut pos = 0;
    while pos < text.len() {
        let end = text[pos..].find("\r\n").map_or(text.len(), |i| pos + i + 2);
        let line = &text[pos..end];
        if line == "\r\n" {
            return (out, end);
        }
        if line.starts_with([' ', '\t']) {
            let last = out.last_mut().expect("continuation line before any field");
            last.raw.push_str(line);
            last.value.push_str(line.trim_end_matches("\r\n"));
        } else {
            let (name, value) = line
                .split_once(':')
                .unwrap_or_else(|| panic!("header line without a colon: {line:?}"));
            out.push(Hdr {
                name: name.trim().to_string(),
                raw: line.to_string(),
                value: value.trim_end_matches("\r\n").to_string(),
            });
        }
        pos = end;
    }
    (out, text.len())
}

/// The authserv-id of an Authentication-Results value: comments removed, first word
/// before the first ';'.
fn authserv_id(value: &str) -> String {
    let mut depth = 0usize;
    let mut s = String::new();
    for ch in value.chars() {
        match ch {
            '(' => depth += 1,
            ')' => depth = depth.saturating_sub(1),
            ';' if depth == 0 => break,
            c if depth == 0 => s.push(c),
            _ => {}
        }
    }
    s.split_whitespace().next().unwrap_or("").to_string()
}

fn is_ar(h: &Hdr) -> bool {
    h.name.eq_ignore_ascii_case("Authentication-Results")
}

/// Ours: an Authentication-Results field with our authserv-id (case-insensitive).
fn is_our_ar(h: &Hdr) -> bool {
    is_ar(h) && authserv_id(&h.value).eq_ignore_ascii_case(AUTHSERV_ID)
}

/// The `;`-separated parts of an A-R value, each trimmed with inner whitespace collapsed.
fn ar_parts(value: &str) -> Vec<String> {
    value
        .split(';')
        .map(|p| p.split_whitespace().collect::<Vec<_>>().join(" "))
        .filter(|p| !p.is_empty())
        .collect()
}

/// The single message the next hop received, asserting it was exactly one.
fn only_message(mta: &FakeMta) -> Message {
    let msgs = mta.messages();
    assert_eq!(
        msgs.len(),
        1,
        "expected exactly one relayed message; next hop saw:\n{}",
        mta.transcripts_debug()
    );
    assert_next_hop_canonical(mta);
    msgs.into_iter().next().unwrap()
}

/// Checks that `m` is `original` with exactly one Authentication-Results of ours added at
/// the top; returns that field. Nothing else may be added (no verdict header: accepted).
fn assert_one_ar_on_top(m: &Message, original: &[u8]) -> Hdr {
    let (fields, _) = header_fields(&m.data);
    let top = fields
        .first()
        .expect("relayed message has no header")
        .clone();
    assert!(
        is_our_ar(&top),
        "the first header at the next hop must be our Authentication-Results; got {:?}\nmessage:\n{}",
        top.raw,
        m.data_str()
    );
    let ours = fields.iter().filter(|h| is_our_ar(h)).count();
    assert_eq!(
        ours,
        1,
        "exactly one Authentication-Results with our id; message:\n{}",
        m.data_str()
    );
    assert!(
        top.raw.starts_with("Authentication-Results: "),
        "{:?}",
        top.raw
    );
    assert_eq!(
        &m.data[top.raw.len()..],
        original,
        "after the added Authentication-Results the message must be the original, byte for byte"
    );
    top
}

/// Asserts the A-R value names `mailwarden.test` first and contains these result parts
/// (each compared as a prefix of one `;` part, e.g. `"dmarc=pass header.from=x"`).
fn assert_ar_results(value: &str, want: &[&str]) {
    let parts = ar_parts(value);
    assert_eq!(
        parts.first().map(String::as_str),
        Some(AUTHSERV_ID),
        "authserv-id must be the hostname: {value:?}"
    );
    for w in want {
        assert!(
            parts.iter().any(|p| p.starts_with(w)),
            "A-R lacks {w:?}: {parts:?}"
        );
    }
    let method = |m: &str| parts.iter().filter(|p| p.starts_with(m)).count();
    assert_eq!(method("dmarc="), 1, "exactly one dmarc result in {parts:?}");
    assert_eq!(
        parts
            .iter()
            .filter(|p| p.starts_with("spf=") && p.contains("smtp.mailfrom="))
            .count(),
        1,
        "exactly one spf smtp.mailfrom result in {parts:?}"
    );
}

// ---------------------------------------------------------------------------
// Quarantine helpers
// ---------------------------------------------------------------------------

struct Entry {
    id: String,
    eml: Vec<u8>,
    meta: serde_json::Value,
}

/// `var/quarantine` under the proxy's working directory (the harness runs it in its dir).
fn quarantine_root(proxy: &Proxy) -> PathBuf {
    proxy.dir.path().join("var/quarantine")
}

fn quarantine_entries(proxy: &Proxy) -> Vec<Entry> {
    let dir = quarantine_root(proxy).join("entries");
    let Ok(rd) = std::fs::read_dir(&dir) else {
        return Vec::new();
    };
    let mut out = Vec::new();
    for e in rd {
        let e = e.expect("read entries dir");
        let path = e.path();
        let id = e.file_name().to_string_lossy().into_owned();
        let eml = std::fs::read(path.join("message.eml"))
            .unwrap_or_else(|err| panic!("{}/message.eml: {err}", path.display()));
        let meta_raw = std::fs::read(path.join("meta.json"))
            .unwrap_or_else(|err| panic!("{}/meta.json: {err}", path.display()));
        let meta: serde_json::Value = serde_json::from_slice(&meta_raw)
            .unwrap_or_else(|err| panic!("{}/meta.json is not JSON: {err}", path.display()));
        out.push(Entry { id, eml, meta });
    }
    out
}

/// The one quarantine entry; checks it holds `original` and its meta describes it.
fn only_entry(proxy: &Proxy, original: &[u8], mail_from: &str) -> Entry {
    let mut entries = quarantine_entries(proxy);
    assert_eq!(
        entries.len(),
        1,
        "expected exactly one quarantine entry under {}",
        quarantine_root(proxy).display()
    );
    let e = entries.pop().unwrap();
    assert!(!e.id.is_empty());
    assert_eq!(
        e.eml, original,
        "quarantined message.eml must be the message"
    );
    let m = &e.meta;
    assert_eq!(m["verdict"], "quarantine", "meta.json: {m}");
    assert_eq!(m["mail_from"], mail_from, "meta.json: {m}");
    assert_eq!(m["rcpts"], serde_json::json!([RCPT]), "meta.json: {m}");
    assert_eq!(m["id"], e.id.as_str(), "meta.json id vs directory: {m}");
    let tmp = quarantine_root(proxy).join("tmp");
    if let Ok(rd) = std::fs::read_dir(&tmp) {
        assert_eq!(
            rd.count(),
            0,
            "half-written entries left in {}",
            tmp.display()
        );
    }
    e
}

/// The quarantine entry whose meta.json subject is `subject`.
fn entry_by_subject(proxy: &Proxy, subject: &str) -> Option<Entry> {
    quarantine_entries(proxy)
        .into_iter()
        .find(|e| e.meta["subject"] == subject)
}

fn flags_of(meta: &serde_json::Value) -> Vec<String> {
    meta["flags"]
        .as_array()
        .unwrap_or_else(|| panic!("meta.json flags is not an array: {meta}"))
        .iter()
        .map(|f| f.as_str().expect("flag string").to_string())
        .collect()
}

// ---------------------------------------------------------------------------
// Running the binary for one-shot commands
// ---------------------------------------------------------------------------

struct Run {
    status: ExitStatus,
    stdout: String,
    stderr: String,
}

/// Runs `mailwarden ARGS` in `dir` (output to files there); kills it and panics after
/// [`BIN_DEADLINE`].
async fn run_bin(dir: &Path, args: &[OsString]) -> Run {
    let mut command = Command::new(bin());
    command.args(args).current_dir(dir);
    let done = common::run_bounded(command, dir, BIN_DEADLINE).await;
    let status = done.status.unwrap_or_else(|| {
        panic!(
            "mailwarden {args:?} did not exit within {BIN_DEADLINE:?}; stderr:\n{}",
            done.stderr
        )
    });
    Run {
        status,
        stdout: done.stdout_text(),
        stderr: done.stderr,
    }
}

fn os(args: &[&str]) -> Vec<OsString> {
    args.iter().map(OsString::from).collect()
}

/// `mailwarden check --json` for one message with the proxy's own config.
async fn check_json(proxy: &Proxy, mail_from: &str, msg: &[u8], name: &str) -> serde_json::Value {
    let msg_path = proxy.dir.path().join(format!("{name}.eml"));
    std::fs::write(&msg_path, msg).expect("write message file");
    let mut args = os(&["check", "--config"]);
    args.push(proxy.config_path.clone().into());
    args.extend(os(&[
        "--ip",
        "127.0.0.1",
        "--helo",
        HELO,
        "--mail-from",
        mail_from,
        "--rcpt",
        RCPT,
        "--json",
    ]));
    args.push(msg_path.into());
    let run = run_bin(proxy.dir.path(), &args).await;
    assert!(
        run.status.success(),
        "check exited with {}; stderr:\n{}",
        run.status,
        run.stderr
    );
    let line = run.stdout.trim();
    serde_json::from_str(line)
        .unwrap_or_else(|e| panic!("check --json printed no JSON object ({e}): {line:?}"))
}

/// Sends SIGHUP through the `kill` utility.
fn sighup(proxy: &Proxy) {
    let st = Command::new("kill")
        .arg("-HUP")
        .arg(proxy.pid().to_string())
        .status()
        .expect("run kill -HUP");
    assert!(st.success(), "kill -HUP failed: {st}");
}

/// Writes a policy file (TOML) and returns its absolute path.
fn write_policy(dir: &Path, text: &str) -> PathBuf {
    let path = dir.join("policy.toml");
    std::fs::write(&path, text).expect("write policy file");
    path
}

fn policy_line(path: &Path) -> String {
    format!("policy_file = {:?}", path.to_str().expect("utf-8 path"))
}

// ===========================================================================
// 1. Aligned mail
// ===========================================================================

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn aligned_mail_relayed_with_one_authentication_results_on_top() {
    bounded(async {
        let env = start(|o| o).await;
        let msg = message("Bob Sender <bob@sender.example>", "aligned", "");
        let r = deliver(&env.proxy, "bob@sender.example", &msg).await;
        assert_reply(&r, "250 2.0.0", "aligned mail at end of data");
        assert_eq!(
            r.text(),
            "2.0.0 Ok: queued as FAKE1",
            "the next hop's reply is passed through"
        );

        let m = only_message(&env.mta);
        assert_eq!(angle_addr(&m.mail), "bob@sender.example");
        assert_eq!(m.rcpt_addrs(), vec![RCPT.to_string()]);
        assert!(m.accepted);
        let ar = assert_one_ar_on_top(&m, &msg);
        assert_ar_results(
            &ar.value,
            &[
                "spf=pass smtp.mailfrom=sender.example",
                "dkim=none",
                "dmarc=pass header.from=sender.example",
            ],
        );
        assert!(
            !m.data_str()
                .to_ascii_lowercase()
                .contains("x-mailwarden-verdict:"),
            "accepted mail carries no verdict header"
        );
        assert!(
            env.dns.queries_for("_dmarc.sender.example") >= 1,
            "the DMARC record was looked up through the test DNS"
        );
        assert!(quarantine_entries(&env.proxy).is_empty());
    })
    .await;
}

// ===========================================================================
// 2. Forged Authentication-Results and verdict headers
// ===========================================================================

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn forged_results_and_verdict_headers_are_removed() {
    bounded(async {
        let env = start(|o| o).await;
        let forged = [
            "Authentication-Results: mailwarden.test; dmarc=pass\r\n",
            // folded
            "Authentication-Results: mailwarden.test;\r\n\tspf=pass smtp.mailfrom=lax.example;\r\n dmarc=pass header.from=lax.example\r\n",
            // folded right after the id
            "Authentication-Results:\r\n mailwarden.test;\r\n\tdmarc=pass\r\n",
            // a comment before the id
            "Authentication-Results: (trusted relay) mailwarden.test; dkim=pass header.d=lax.example\r\n",
            // upper-case id
            "Authentication-Results: MAILWARDEN.TEST; dmarc=pass\r\n",
            // lower-case field name, an authres-version after the id
            "authentication-results: mailwarden.test 1; dmarc=pass\r\n",
            // no space before the first result
            "Authentication-Results: mailwarden.test;dmarc=pass\r\n",
            // a comment right after the id
            "Authentication-Results: mailwarden.test(x); spf=pass smtp.mailfrom=lax.example\r\n",
            // obsolete syntax: white space before the colon (RFC 5322 4.5.8)
            "Authentication-Results : mailwarden.test; dmarc=pass\r\n",
            "X-Mailwarden-Verdict: clean\r\n",
            "X-Mailwarden-Verdict : clean\r\n",
            "x-mailwarden-verdict: accept; flags=none\r\n",
        ];
        let kept = [
            "Authentication-Results: other.example; dmarc=pass header.from=lax.example\r\n",
            // an id that merely starts like ours is someone else's
            "Authentication-Results: mailwarden.test.evil.example; dmarc=pass\r\n",
            "Received: from relay.lax.example by mx.lax.example; Tue, 25 Nov 2025 09:59:00 +0000\r\n",
        ];
        // Interleave forged and kept fields.
        let mut extra = String::new();
        for (i, f) in forged.iter().enumerate() {
            extra.push_str(f);
            if let Some(k) = kept.get(i) {
                extra.push_str(k);
            }
        }
        // p=none sender: DMARC fails but the mail is relayed, so the forged dmarc=pass
        // would matter downstream.
        let msg = message("Lax <news@lax.example>", "forged", &extra);
        let r = deliver(&env.proxy, "news@lax.example", &msg).await;
        assert_reply(&r, "250 2.0.0", "p=none sender with forged headers");

        let m = only_message(&env.mta);
        let (fields, body_at) = header_fields(&m.data);
        let top = &fields[0];
        assert!(
            is_our_ar(top),
            "our A-R must be on top: {:?}\n{}",
            top.raw,
            m.data_str()
        );
        assert_ar_results(
            &top.value,
            &[
                "spf=fail smtp.mailfrom=lax.example",
                "dmarc=fail header.from=lax.example",
            ],
        );
        let ours: Vec<&Hdr> = fields.iter().filter(|h| is_our_ar(h)).collect();
        assert_eq!(
            ours.len(),
            1,
            "only the A-R mailwarden added may carry our id; found {:#?}",
            ours.iter().map(|h| &h.raw).collect::<Vec<_>>()
        );
        for h in &fields {
            assert!(
                !h.name.eq_ignore_ascii_case("X-Mailwarden-Verdict"),
                "a verdict header from outside survived: {:?}",
                h.raw
            );
        }
        for k in kept {
            assert_eq!(
                fields.iter().filter(|h| h.raw == k).count(),
                1,
                "{k:?} must survive unchanged\n{}",
                m.data_str()
            );
        }
        // Everything but the forged fields, in order, byte for byte; body intact.
        let (orig_fields, orig_body_at) = header_fields(&msg);
        let expected: String = orig_fields
            .iter()
            .filter(|h| !is_our_ar(h) && !h.name.eq_ignore_ascii_case("X-Mailwarden-Verdict"))
            .map(|h| h.raw.as_str())
            .collect();
        let got: String = fields[1..].iter().map(|h| h.raw.as_str()).collect();
        assert_eq!(got, expected, "the other header fields must be untouched");
        assert_eq!(
            &m.data[body_at..],
            &msg[orig_body_at..],
            "the body (with its A-R-looking line) must be intact"
        );
    })
    .await;
}

// ===========================================================================
// 3. DMARC policies of failing senders
// ===========================================================================

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dmarc_reject_sender_gets_550_and_nothing_is_relayed() {
    bounded(async {
        let env = start(|o| o).await;
        let msg = message("<ceo@spoof.example>", "dmarc-reject", "");
        let mut c = env.proxy.connect_ehlo(HELO).await;
        let r = transaction(&mut c, "ceo@spoof.example", &msg).await;
        assert_reply(&r, "550 5.7.1", "DMARC p=reject sender at end of data");
        assert!(
            r.text().len() > "5.7.1 ".len(),
            "550 without a reason: {r:?}"
        );
        assert!(
            env.mta.messages().is_empty(),
            "a rejected message reached the next hop:\n{}",
            env.mta.transcripts_debug()
        );
        assert!(quarantine_entries(&env.proxy).is_empty());

        // The session stays usable: an aligned message right after is relayed.
        let ok = message("<bob@sender.example>", "after-reject", "");
        let r = transaction(&mut c, "bob@sender.example", &ok).await;
        assert_reply(&r, "250 2.0.0", "aligned mail after a rejected one");
        let q = c.cmd("QUIT").await;
        assert_reply(&q, "221 2.0.0", "QUIT");
        let m = only_message(&env.mta);
        assert_eq!(angle_addr(&m.mail), "bob@sender.example");
        assert_one_ar_on_top(&m, &ok);
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dmarc_quarantine_sender_is_held_not_relayed() {
    bounded(async {
        let env = start(|o| o).await;
        let msg = message("Q <news@quar.example>", "dmarc-quarantine", "");
        let r = deliver(&env.proxy, "news@quar.example", &msg).await;
        assert_reply(&r, "250 2.0.0", "p=quarantine sender: held, accepted");
        assert!(
            env.mta.messages().is_empty(),
            "a quarantined message reached the next hop:\n{}",
            env.mta.transcripts_debug()
        );
        let e = only_entry(&env.proxy, &msg, "news@quar.example");
        assert!(
            r.text().contains(&e.id),
            "the 250 should name the quarantine id {}: {r:?}",
            e.id
        );
        assert_eq!(flags_of(&e.meta), Vec::<String>::new(), "{}", e.meta);
        let ar = e.meta["authentication_results"].as_str().unwrap_or("");
        assert_ar_results(
            ar,
            &[
                "spf=fail smtp.mailfrom=quar.example",
                "dmarc=fail header.from=quar.example",
            ],
        );
        assert_eq!(e.meta["state"], "held", "{}", e.meta);
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dmarc_none_sender_is_relayed() {
    bounded(async {
        let env = start(|o| o).await;
        let msg = message("<news@lax.example>", "dmarc-none", "");
        let r = deliver(&env.proxy, "news@lax.example", &msg).await;
        assert_reply(&r, "250 2.0.0", "p=none sender");
        let m = only_message(&env.mta);
        let ar = assert_one_ar_on_top(&m, &msg);
        assert_ar_results(
            &ar.value,
            &[
                "spf=fail smtp.mailfrom=lax.example",
                "dmarc=fail header.from=lax.example",
            ],
        );
        assert!(quarantine_entries(&env.proxy).is_empty());
    })
    .await;
}

// ===========================================================================
// 4. Spoof flags
// ===========================================================================

fn protect_alice(mut o: ProxyOptions) -> ProxyOptions {
    o.extra_toml
        .push("[spoof]\nprotected_names = [\"Alice Example\"]".into());
    o
}

/// Sends `msg`, expects it quarantined (250, nothing relayed) and returns its flags.
async fn expect_quarantined(env: &Env, mail_from: &str, msg: &[u8]) -> Vec<String> {
    let r = deliver(&env.proxy, mail_from, msg).await;
    assert_reply(&r, "250 2.0.0", "quarantined message");
    assert!(
        env.mta.messages().is_empty(),
        "a message that should be held reached the next hop:\n{}",
        env.mta.transcripts_debug()
    );
    let e = only_entry(&env.proxy, msg, mail_from);
    flags_of(&e.meta)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn own_domain_spoof_from_outside_is_quarantined() {
    bounded(async {
        let env = start(protect_alice).await;
        // SPF passes for sender.example, but From: is ours and nothing aligns with it.
        let msg = message("CEO <ceo@example.org>", "own-domain", "");
        let flags = expect_quarantined(&env, "bob@sender.example", &msg).await;
        assert_eq!(flags, vec!["own-domain-spoof".to_string()]);
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn display_name_spoof_is_quarantined() {
    bounded(async {
        let env = start(protect_alice).await;
        // SPF pass for freemail.example, no DMARC record: DMARC none.
        let msg = message("\"Alice Example\" <alice@freemail.example>", "display", "");
        let flags = expect_quarantined(&env, "alice@freemail.example", &msg).await;
        assert_eq!(flags, vec!["display-name-spoof".to_string()]);
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn display_name_spoof_with_dmarc_fail_is_quarantined() {
    bounded(async {
        let env = start(protect_alice).await;
        // DMARC fails with p=none: only the flag can hold it.
        let msg = message("\"Alice Example\" <alice@lax.example>", "display-fail", "");
        let flags = expect_quarantined(&env, "alice@lax.example", &msg).await;
        assert_eq!(flags, vec!["display-name-spoof".to_string()]);
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn protected_display_name_on_aligned_mail_is_not_flagged() {
    bounded(async {
        let env = start(protect_alice).await;
        let msg = message(
            "\"Alice Example\" <alice@sender.example>",
            "aligned-alice",
            "",
        );
        let r = deliver(&env.proxy, "alice@sender.example", &msg).await;
        assert_reply(
            &r,
            "250 2.0.0",
            "aligned mail with a protected display name",
        );
        let m = only_message(&env.mta);
        let ar = assert_one_ar_on_top(&m, &msg);
        assert_ar_results(&ar.value, &["dmarc=pass header.from=sender.example"]);
        assert!(quarantine_entries(&env.proxy).is_empty());
        let log = env
            .proxy
            .wait_log(" verdict", Duration::from_secs(10))
            .await;
        assert!(
            !log.contains("display-name-spoof"),
            "aligned mail must not be flagged; log:\n{log}"
        );
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn lookalike_domain_is_quarantined() {
    bounded(async {
        let env = start(protect_alice).await;
        let msg = message("<x@examp1e.org>", "lookalike", "");
        let flags = expect_quarantined(&env, "x@examp1e.org", &msg).await;
        assert_eq!(flags, vec!["lookalike-domain".to_string()]);
    })
    .await;
}

// ===========================================================================
// 5. Shadow rules
// ===========================================================================

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shadow_rule_is_logged_and_never_acts() {
    bounded(async {
        let dir = tempfile::tempdir().unwrap();
        let policy = write_policy(
            dir.path(),
            "[[rule]]\nname = \"trial-reject-everything\"\naction = \"reject\"\nreason = \"trial\"\nshadow = true\n",
        );
        let line = policy_line(&policy);
        let env = start_in(dir, |mut o| {
            o.auth_extra.push(line);
            o
        })
        .await;
        let msg = message("<bob@sender.example>", "shadow", "");
        let r = deliver(&env.proxy, "bob@sender.example", &msg).await;
        assert_reply(&r, "250 2.0.0", "a shadow reject rule must not act");
        let m = only_message(&env.mta);
        assert_one_ar_on_top(&m, &msg);

        let log = env
            .proxy
            .wait_log("shadow rule matched", Duration::from_secs(10))
            .await;
        let hit = log
            .lines()
            .find(|l| l.contains("shadow rule matched"))
            .unwrap();
        assert!(
            hit.contains("trial-reject-everything"),
            "the shadow log line must name the rule: {hit:?}"
        );
    })
    .await;
}

// ===========================================================================
// 6. DNS that never answers
// ===========================================================================

/// Session 1 sends a message while DNS is black-holed; while it waits, session 2 runs
/// EHLO/NOOP/QUIT. Returns (end-of-data reply, time it took, session 2 done before).
async fn blackholed_delivery(env: &Env) -> (Reply, Duration, bool) {
    env.dns.set_blackhole(true);
    let msg = message("<bob@sender.example>", "blackhole", "");
    let mut c1 = env.proxy.connect_ehlo(HELO).await;
    let r = c1.cmd("MAIL FROM:<bob@sender.example>").await;
    assert_reply(&r, "250 2.1.0", "MAIL (no DNS at MAIL FROM by default)");
    let r = c1.cmd(&format!("RCPT TO:<{RCPT}>")).await;
    assert_reply(&r, "250 2.1.5", "RCPT");
    let r = c1.cmd("DATA").await;
    assert_reply(&r, "354", "DATA");
    let sent = Instant::now();
    c1.send_raw(&common::smtp_client::dot_stuff_and_terminate(&msg))
        .await;
    let waiting = tokio::spawn(async move {
        let r = c1.read_reply().await;
        let took = sent.elapsed();
        let q = c1.cmd("QUIT").await;
        assert_reply(&q, "221 2.0.0", "QUIT after the deferral");
        (r, took)
    });

    // While session 1 waits for its verdict, the proxy keeps serving.
    tokio::time::sleep(Duration::from_millis(200)).await;
    let mut c2 = env.proxy.connect().await;
    let g = c2.read_reply().await;
    assert_reply(&g, "220", "greeting of the second session");
    let e = c2.cmd("EHLO second.client.example").await;
    assert_reply(&e, "250", "EHLO of the second session");
    let n = c2.cmd("NOOP").await;
    assert_reply(&n, "250 2.0.0", "NOOP of the second session");
    let q = c2.cmd("QUIT").await;
    assert_reply(&q, "221 2.0.0", "QUIT of the second session");
    let second_first = !waiting.is_finished();

    let (r, took) = waiting.await.expect("session 1 task");
    (r, took, second_first)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unanswered_dns_defers_within_budget_small_dns_timeout() {
    bounded(async {
        let dns = DnsServer::start(zone());
        let mta = FakeMta::start(Script::default()).await;
        let mut o = auth_options(&mta, &dns);
        o.auth_extra.push("time_budget = \"3s\"".into());
        let proxy = Proxy::start_edited(o, |text| {
            let edited = text.replacen("[dns]\n", "[dns]\ntimeout_ms = 300\nattempts = 1\n", 1);
            assert_ne!(edited, text, "config template has no [dns] table");
            edited
        })
        .await;
        let env = Env { dns, mta, proxy };
        let (r, took, _) = blackholed_delivery(&env).await;
        assert_reply(&r, "451 4.7.1", "DNS never answers: defer");
        assert!(
            took < Duration::from_secs(30),
            "the deferral took {took:?} (budget 3 s)"
        );
        eprintln!("small dns timeout: 451 after {took:?}");
        assert!(env.dns.query_count() > 0, "the proxy never asked the DNS");
        assert!(
            env.mta.messages().is_empty(),
            "a deferred message was relayed"
        );
        assert!(quarantine_entries(&env.proxy).is_empty());
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unanswered_dns_defers_at_time_budget_and_proxy_keeps_serving() {
    bounded(async {
        // Default per-query timeout (2 s x 2 attempts): only the 3 s budget bounds it.
        let env = start(|mut o| {
            o.auth_extra.push("time_budget = \"3s\"".into());
            o
        })
        .await;
        let (r, took, second_first) = blackholed_delivery(&env).await;
        assert_reply(&r, "451 4.7.1", "DNS never answers: defer at the budget");
        assert!(
            took < Duration::from_secs(30),
            "the deferral took {took:?} (budget 3 s)"
        );
        eprintln!("budget: 451 after {took:?}");
        assert!(
            second_first,
            "the second session must complete while the first waits for its verdict (first took {took:?})"
        );
        assert!(env.mta.messages().is_empty(), "a deferred message was relayed");

        // DNS back: the same proxy authenticates again.
        env.dns.set_blackhole(false);
        let msg = message("<bob@sender.example>", "after-blackhole", "");
        let r = deliver(&env.proxy, "bob@sender.example", &msg).await;
        assert_reply(&r, "250 2.0.0", "after DNS recovered");
        let m = only_message(&env.mta);
        let ar = assert_one_ar_on_top(&m, &msg);
        assert_ar_results(&ar.value, &["spf=pass smtp.mailfrom=sender.example", "dmarc=pass"]);
    })
    .await;
}

// ===========================================================================
// 7. SIGHUP reload
// ===========================================================================

const REJECT_SENDER: &str = "[[rule]]\nname = \"no-sender-example\"\nfrom_domain = [\"sender.example\"]\naction = \"reject\"\nreason = \"sender.example is not welcome here\"\n";
const BROKEN_POLICY: &str =
    "[[rule]]\nname = \"broken\"\naction = \"reject\"\nflags = [\"no-such-flag\"]\n";
const ACCEPT_SENDER: &str = "[[rule]]\nname = \"welcome-sender-example\"\nfrom_domain = [\"sender.example\"]\naction = \"accept\"\n";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sighup_reloads_policy_and_keeps_running_policy_on_error() {
    bounded(async {
        let dir = tempfile::tempdir().unwrap();
        let policy = write_policy(dir.path(), REJECT_SENDER);
        let line = policy_line(&policy);
        let env = start_in(dir, |mut o| {
            o.auth_extra.push(line);
            o
        })
        .await;
        let msg = message("<bob@sender.example>", "reload", "");

        let r = deliver(&env.proxy, "bob@sender.example", &msg).await;
        assert_reply(&r, "550 5.7.1", "policy rejects sender.example");
        assert_eq!(r.text(), "5.7.1 sender.example is not welcome here");

        // A broken file: the reload fails, the running policy stays.
        std::fs::write(&policy, BROKEN_POLICY).unwrap();
        sighup(&env.proxy);
        let log = env
            .proxy
            .wait_log("reload failed", Duration::from_secs(20))
            .await;
        let failed = log.lines().find(|l| l.contains("reload failed")).unwrap();
        assert!(
            failed.contains(policy.to_str().unwrap()),
            "the reload error should name the policy file: {failed:?}"
        );
        let r = deliver(&env.proxy, "bob@sender.example", &msg).await;
        assert_reply(
            &r,
            "550 5.7.1",
            "after a failed reload the old policy still rejects",
        );
        assert_eq!(r.text(), "5.7.1 sender.example is not welcome here");

        // Fixed: the new policy is used.
        std::fs::write(&policy, ACCEPT_SENDER).unwrap();
        sighup(&env.proxy);
        env.proxy
            .wait_log("configuration reloaded", Duration::from_secs(20))
            .await;
        let r = deliver(&env.proxy, "bob@sender.example", &msg).await;
        assert_reply(&r, "250 2.0.0", "after a good reload");
        let m = only_message(&env.mta);
        assert_one_ar_on_top(&m, &msg);
    })
    .await;
}

// ===========================================================================
// 8. check-config on a broken policy file
// ===========================================================================

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn check_config_reports_broken_policy_file_line_and_key() {
    bounded(async {
        let dir = tempfile::tempdir().unwrap();
        let policy = write_policy(dir.path(), REJECT_SENDER);
        let line = policy_line(&policy);
        let mut env = start_in(dir, |mut o| {
            o.auth_extra.push(line);
            o
        })
        .await;
        let cfg = env.proxy.config_path.clone();
        let work = env.proxy.dir.path().to_path_buf();
        let check_config = || {
            let mut a = os(&["check-config", "--config"]);
            a.push(cfg.clone().into());
            a
        };

        let ok = run_bin(&work, &check_config()).await;
        assert!(
            ok.status.success(),
            "check-config on a valid config + policy: {} {}",
            ok.status,
            ok.stderr
        );

        let pfile = policy.to_str().unwrap();
        // Every case is tried; the failures are reported together at the end.
        let mut failures: Vec<String> = Vec::new();
        // (text, line, key) of each broken policy
        let cases = [
            (BROKEN_POLICY, 4, "flags"),
            (
                "[[rule]]\nname = \"x\"\naction = \"explode\"\n",
                3,
                "action",
            ),
            (
                "[[rule]]\nname = \"x\"\naction = \"reject\"\n\n[[rule]]\nname = \"x\"\naction = \"accept\"\n",
                6,
                "name",
            ),
        ];
        for (text, line, key) in cases {
            std::fs::write(&policy, text).unwrap();
            let run = run_bin(&work, &check_config()).await;
            let want = format!("{pfile}:{line}:");
            let named = run
                .stderr
                .lines()
                .find(|l| l.contains(&want))
                .is_some_and(|l| l[l.find(&want).unwrap() + want.len()..].contains(key));
            if run.status.success() || !named {
                failures.push(format!(
                    "check-config with policy {text:?}: want a non-zero exit and `{want} ...{key}...` on stderr; got {}, stdout {:?}, stderr {:?}",
                    run.status, run.stdout, run.stderr
                ));
            }
        }

        // `run` refuses to start with it as well, naming the file.
        env.proxy.sigterm();
        let st = env.proxy.wait_exit(Duration::from_secs(40)).await;
        assert!(st.success(), "proxy exit on SIGTERM: {st}");
        std::fs::write(&policy, BROKEN_POLICY).unwrap();
        let mut a = os(&["run", "--config"]);
        a.push(cfg.clone().into());
        let run = run_bin(&work, &a).await;
        if run.status.success() || !run.stderr.contains(&format!("{pfile}:4:")) {
            failures.push(format!(
                "run with a broken policy file: want a non-zero exit naming `{pfile}:4:`; got {}, stderr {:?}",
                run.status, run.stderr
            ));
        }
        assert!(failures.is_empty(), "{}", failures.join("\n\n"));
    })
    .await;
}

// ===========================================================================
// `check --json` agrees with the live proxy
// ===========================================================================

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn check_json_gives_the_live_verdict() {
    bounded(async {
        let env = start(|o| o).await;

        // (1) aligned: relayed by the proxy.
        let msg = message("Bob Sender <bob@sender.example>", "aligned", "");
        let r = deliver(&env.proxy, "bob@sender.example", &msg).await;
        assert_reply(&r, "250 2.0.0", "aligned mail");
        let m = only_message(&env.mta);
        let live_ar = assert_one_ar_on_top(&m, &msg);
        let j = check_json(&env.proxy, "bob@sender.example", &msg, "aligned").await;
        assert_eq!(j["verdict"], "accept", "check: {j}");
        assert_eq!(j["flags"], serde_json::json!([]), "check: {j}");
        assert_eq!(j["spf"]["mail_from"]["result"], "pass", "check: {j}");
        assert_eq!(
            j["spf"]["mail_from"]["domain"], "sender.example",
            "check: {j}"
        );
        assert_eq!(j["dmarc"]["result"], "pass", "check: {j}");
        assert_eq!(j["dmarc"]["policy"], "reject", "check: {j}");
        assert_eq!(j["dmarc"]["header_from"], "sender.example", "check: {j}");
        assert_eq!(j["dkim"], serde_json::json!([]), "check: {j}");
        let check_ar = j["authentication_results"]
            .as_str()
            .unwrap_or_else(|| panic!("no authentication_results: {j}"));
        assert_eq!(
            ar_parts(check_ar),
            ar_parts(&live_ar.value),
            "check's Authentication-Results vs the relayed one"
        );

        // DMARC reject: 550 live, reject offline.
        let bad = message("<ceo@spoof.example>", "reject", "");
        let r = deliver(&env.proxy, "ceo@spoof.example", &bad).await;
        assert_reply(&r, "550 5.7.1", "DMARC reject");
        let j = check_json(&env.proxy, "ceo@spoof.example", &bad, "reject").await;
        assert_eq!(j["verdict"], "reject", "check: {j}");
        assert_eq!(j["dmarc"]["result"], "fail", "check: {j}");

        // Own-domain spoof: quarantined live, same flags offline.
        let spoof = message("<ceo@example.org>", "own", "");
        let r = deliver(&env.proxy, "bob@sender.example", &spoof).await;
        assert_reply(&r, "250 2.0.0", "own-domain spoof");
        let e = only_entry(&env.proxy, &spoof, "bob@sender.example");
        let j = check_json(&env.proxy, "bob@sender.example", &spoof, "own").await;
        assert_eq!(j["verdict"], "quarantine", "check: {j}");
        assert_eq!(j["flags"], e.meta["flags"], "check: {j}\nmeta: {}", e.meta);
        assert_eq!(
            j["authentication_results"], e.meta["authentication_results"],
            "check vs quarantine meta"
        );
        assert_eq!(
            env.mta.messages().len(),
            1,
            "only the aligned one was relayed"
        );
    })
    .await;
}

// ===========================================================================
// More spoof-flag variants (contract "Flags")
// ===========================================================================

/// Sends each (From value, MAIL FROM, subject) and expects it held with exactly `flag`.
async fn expect_each_flagged(env: &Env, cases: &[(&str, &str, &str)], flag: &str) {
    let mut failures = Vec::new();
    for (from, mail_from, subject) in cases {
        let msg = message(from, subject, "");
        let r = deliver(&env.proxy, mail_from, &msg).await;
        let got = entry_by_subject(&env.proxy, subject).map(|e| flags_of(&e.meta));
        if !r.is("250 2.0.0") || got.as_deref() != Some(&[flag.to_string()][..]) {
            failures.push(format!(
                "From: {from} / MAIL FROM:<{mail_from}>: reply {:?}, quarantine flags {got:?} (want [{flag}])",
                r.raw
            ));
        }
    }
    assert!(
        env.mta.messages().is_empty(),
        "a message that should be held reached the next hop:\n{}",
        env.mta.transcripts_debug()
    );
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn display_name_spoof_is_case_space_and_diacritics_insensitive() {
    bounded(async {
        let env = start(protect_alice).await;
        expect_each_flagged(
            &env,
            &[
                (
                    "\"ALICE   EXAMPLE\" <a@freemail.example>",
                    "a@freemail.example",
                    "dn-upper",
                ),
                (
                    "=?utf-8?q?Alic=C3=A9_Ex=C3=A4mple?= <a@freemail.example>",
                    "a@freemail.example",
                    "dn-diacritics",
                ),
                (
                    "alice example <a@freemail.example>",
                    "a@freemail.example",
                    "dn-lower",
                ),
            ],
            "display-name-spoof",
        )
        .await;
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn lookalike_variants_flagged_and_suffix_trick_is_not() {
    bounded(async {
        let env = start(|o| o).await;
        expect_each_flagged(
            &env,
            &[
                ("<x@exarnple.org>", "x@exarnple.org", "la-rn"),
                ("<x@xn--xample-9ua.org>", "x@xn--xample-9ua.org", "la-idna"),
                // only the MAIL FROM domain looks like ours (From: has no DMARC record)
                ("<x@freemail.example>", "x@examp1e.org", "la-mailfrom"),
            ],
            "lookalike-domain",
        )
        .await;

        // example.org.evil.example is not a look-alike (contract), nor ours: relayed.
        let msg = message("<x@example.org.evil.example>", "la-suffix", "");
        let r = deliver(&env.proxy, "x@example.org.evil.example", &msg).await;
        assert_reply(&r, "250 2.0.0", "example.org.evil.example");
        assert!(
            entry_by_subject(&env.proxy, "la-suffix").is_none(),
            "example.org.evil.example must not be held"
        );
        let m = only_message(&env.mta);
        assert_one_ar_on_top(&m, &msg);
    })
    .await;
}

// ===========================================================================
// Tagged mail (contract "Headers on relayed mail")
// ===========================================================================

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tagged_mail_gets_verdict_header_and_subject_prefix() {
    bounded(async {
        let dir = tempfile::tempdir().unwrap();
        let policy = write_policy(
            dir.path(),
            "[[rule]]\nname = \"tag-lax\"\nfrom_domain = [\"lax.example\"]\naction = \"tag\"\nreason = \"odd sender\"\n",
        );
        let line = policy_line(&policy);
        let env = start_in(dir, |mut o| {
            o.auth_extra.push(line);
            o.auth_extra.push("subject_prefix = \"[SUSPICIOUS] \"".into());
            o
        })
        .await;
        let msg = message(
            "<news@lax.example>",
            "tagme",
            "X-Mailwarden-Verdict: clean\r\n",
        );
        let r = deliver(&env.proxy, "news@lax.example", &msg).await;
        assert_reply(&r, "250 2.0.0", "tagged mail is relayed");
        let m = only_message(&env.mta);
        let (fields, _) = header_fields(&m.data);
        assert!(is_our_ar(&fields[0]), "A-R on top: {}", m.data_str());
        let verdicts: Vec<&Hdr> = fields
            .iter()
            .filter(|h| h.name.eq_ignore_ascii_case("X-Mailwarden-Verdict"))
            .collect();
        assert_eq!(
            verdicts.len(),
            1,
            "exactly one verdict header (ours): {}",
            m.data_str()
        );
        let v = &verdicts[0].value;
        let parts = ar_parts(v);
        assert_eq!(parts.first().map(String::as_str), Some("tag"), "{v:?}");
        assert!(
            parts.iter().any(|p| p.starts_with("flags=")),
            "verdict header lacks flags=: {v:?}"
        );
        assert!(
            parts.iter().any(|p| p.starts_with("reasons=")),
            "contract: `X-Mailwarden-Verdict: tag; flags=...; reasons=...`; got {v:?}"
        );
        let subjects: Vec<&Hdr> = fields
            .iter()
            .filter(|h| h.name.eq_ignore_ascii_case("Subject"))
            .collect();
        assert_eq!(subjects.len(), 1, "one Subject: {}", m.data_str());
        assert_eq!(subjects[0].value.trim(), "[SUSPICIOUS] tagme");
    })
    .await;
}

// ===========================================================================
// spf_early_reject (contract [auth])
// ===========================================================================

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn spf_early_reject_refuses_at_mail_from() {
    bounded(async {
        let env = start(|mut o| {
            o.auth_extra.push("spf_early_reject = true".into());
            o
        })
        .await;
        let mut c = env.proxy.connect_ehlo(HELO).await;
        let r = c.cmd("MAIL FROM:<ceo@spoof.example>").await;
        assert_reply(&r, "550 5.7.23", "MAIL FROM with SPF fail");
        let r = c.cmd("MAIL FROM:<news@lax.example>").await;
        assert_reply(&r, "550 5.7.23", "MAIL FROM with SPF fail (p=none)");
        let msg = message("<bob@sender.example>", "early", "");
        let r = transaction(&mut c, "bob@sender.example", &msg).await;
        assert_reply(&r, "250 2.0.0", "SPF pass after early rejects");
        let q = c.cmd("QUIT").await;
        assert_reply(&q, "221 2.0.0", "QUIT");
        let m = only_message(&env.mta);
        assert_one_ar_on_top(&m, &msg);
    })
    .await;
}
