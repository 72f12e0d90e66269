//! Outbound DKIM signing end to end: the real `mailwarden run` with a submission listener
//! (STARTTLS, AUTH relayed to the fake next hop), keys made by `mailwarden dkim keygen`,
//! messages captured at the fake next hop (tests/common/fake_mta.rs) and verified by
//! three independent verifiers:
//!
//! * dkimpy (Debian `python3-dkim`, `python3-nacl` for Ed25519);
//! * OpenDKIM's library through `opendkim-testmsg` (Debian `opendkim-tools`). It only
//!   asks the nameservers of /etc/resolv.conf on port 53, so the loopback DNS server
//!   (tests/common/dns.rs) listens on port 53 of a 127.x.y.z address and the tool runs
//!   under `unshare --mount` with a private /etc/resolv.conf bind-mounted over the
//!   system one (root only, as CI runs; the machine's own file is never touched);
//! * our own verifier (`mailwarden check --json`).
//!
//! RSA-2048 and Ed25519, simple/simple and relaxed/relaxed, one domain with both keys
//! (dual signing: two signatures, both verify); tampered copies (body, a signed header,
//! an added second From) fail everywhere; whitespace re-folding passes relaxed only; a
//! From domain without a key is relayed unsigned and the log line says so; a held
//! outbound message is signed when released; bad keys stop the start with file, line
//! and key. Everything listens on 127.0.0.0/8 only.

mod common;

use std::collections::BTreeMap;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use base64::Engine;
use common::dns::{DnsServer, Zone};
use common::fake_mta::{Act, FakeMta, Script};
use common::smtp_client::{Client, Reply, assert_reply, dot_stuff_and_terminate};
use common::{Proxy, ProxyOptions, bin, show};
use serde_json::Value;

const TEST_DEADLINE: Duration = Duration::from_secs(240);
const CLI_DEADLINE: Duration = Duration::from_secs(60);
const RELAYED: &str = "relayed-by-next-hop";
const HELO: &str = "laptop.example.org";

/// (domain, keys as (algo, selector), canonicalization).
type Keys = &'static [(&'static str, &'static str)];
const DOMAINS: [(&str, Keys, &str); 6] = [
    ("rsa-simple.test", &[("rsa", "r1")], "simple/simple"),
    ("rsa-relaxed.test", &[("rsa", "r1")], "relaxed/relaxed"),
    ("ed-simple.test", &[("ed25519", "e1")], "simple/simple"),
    ("ed-relaxed.test", &[("ed25519", "e1")], "relaxed/relaxed"),
    (
        "dual.test",
        &[("rsa", "r1"), ("ed25519", "e1")],
        "relaxed/relaxed",
    ),
    // Configured for nobody: its users' mail goes out unsigned.
    ("nokey.test", &[], ""),
];

async fn within<F: std::future::Future<Output = ()>>(fut: F) {
    if tokio::time::timeout(TEST_DEADLINE, fut).await.is_err() {
        panic!("test did not finish within {TEST_DEADLINE:?}");
    }
}

fn b64(s: &str) -> String {
    base64::engine::general_purpose::STANDARD.encode(s)
}

fn user(domain: &str) -> String {
    format!("user@{domain}")
}

fn password_of(user: &str) -> String {
    format!("pw-{}-Xk4", user.replace('@', "-"))
}

/// A message with what canonicalization is about: a folded header, trailing spaces and
/// tabs in header and body, a line starting with a dot, empty lines at the end.
fn message(from: &str, subject: &str) -> Vec<u8> {
    format!(
        "From: Sender Name <{from}>\r\n\
         To: Bob <bob@example.net>,\r\n Carol <carol@example.net>\r\n\
         Subject: {subject}   \r\n\
         Date: Thu, 03 Dec 2026 10:00:00 +0000\r\n\
         Message-ID: <{subject}@laptop.example.org>\r\n\
         MIME-Version: 1.0\r\n\
         Content-Type: text/plain; charset=utf-8\r\n\
         X-Mailer:   Example\t 1.0\r\n\
         \r\n\
         Hello Bob,  \r\n\
         .a line with a leading dot\r\n\
         Grüße\t\r\n\
         \r\n\
         \r\n"
    )
    .into_bytes()
}

// ---------------------------------------------------------------------------
// Keys (made by `mailwarden dkim keygen`) and DNS
// ---------------------------------------------------------------------------

struct Key {
    domain: &'static str,
    selector: &'static str,
    file: PathBuf,
    /// The TXT value keygen printed.
    txt: String,
}

fn keygen(dir: &Path, domain: &'static str, selector: &'static str, algo: &'static str) -> Key {
    let file = dir.join(format!("{domain}.{selector}.key"));
    let out = Command::new(bin())
        .args([
            "dkim",
            "keygen",
            "--domain",
            domain,
            "--selector",
            selector,
            "--algo",
            algo,
            "--out",
        ])
        .arg(&file)
        .output()
        .expect("run dkim keygen");
    let stdout = String::from_utf8_lossy(&out.stdout).to_string();
    assert!(
        out.status.success(),
        "keygen: {stdout}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let line = |p: &str| {
        stdout
            .lines()
            .find_map(|l| l.strip_prefix(p))
            .unwrap_or_else(|| panic!("keygen printed no `{p}` line:\n{stdout}"))
            .trim()
            .to_string()
    };
    assert_eq!(line("name:"), format!("{selector}._domainkey.{domain}"));
    let txt = line("value:");
    // The zone line splits the value into strings of at most 255 octets.
    let zone = line("zone:");
    let strings: Vec<&str> = zone.split('"').skip(1).step_by(2).collect();
    assert!(strings.iter().all(|s| s.len() <= 255), "{zone}");
    assert_eq!(strings.concat(), txt, "{zone}");
    Key {
        domain,
        selector,
        file,
        txt,
    }
}

/// A loopback address whose port 53 is free: 127.x.y.z from the process id.
fn port53_dns(zone: &Zone) -> DnsServer {
    let pid = std::process::id();
    for attempt in 0..20u32 {
        let n = pid.wrapping_mul(2_654_435_761).wrapping_add(attempt * 7919);
        let ip = Ipv4Addr::new(
            127,
            100 + (n % 100) as u8,
            (n >> 8) as u8,
            1 + (n >> 16) as u8 % 250,
        );
        let at = SocketAddr::new(IpAddr::V4(ip), 53);
        match DnsServer::start_on(zone.clone(), Some(at)) {
            Ok(s) => return s,
            Err(e) if e.kind() == std::io::ErrorKind::AddrInUse => continue,
            Err(e) => panic!(
                "cannot listen on {at} ({e}): OpenDKIM's verifier only asks port 53; run as root, as CI does"
            ),
        }
    }
    panic!("no free port 53 on 127.100-199.x.y");
}

struct World {
    dir: tempfile::TempDir,
    keys: Vec<Key>,
    dns: DnsServer,
    mta: FakeMta,
    proxy: Proxy,
}

impl World {
    async fn start() -> World {
        let dir = tempfile::tempdir().expect("tempdir");
        let mut keys = Vec::new();
        for (domain, ks, _) in DOMAINS {
            for (algo, selector) in ks {
                keys.push(keygen(dir.path(), domain, selector, algo));
            }
        }
        let mut zone = Zone::new();
        for k in &keys {
            zone = zone.txt(&format!("{}._domainkey.{}", k.selector, k.domain), &k.txt);
        }
        let dns = port53_dns(&zone);

        let script = Script {
            eod: Act::reply(&format!("250 2.0.0 Ok: {RELAYED}")),
            ..Script::default()
        }
        .with_auth();
        let mta = FakeMta::start(script).await;
        let users: Vec<(String, String)> = DOMAINS
            .iter()
            .map(|(d, _, _)| (user(d), password_of(&user(d))))
            .collect();
        let refs: Vec<(&str, &str)> = users
            .iter()
            .map(|(u, p)| (u.as_str(), p.as_str()))
            .collect();
        mta.set_auth_users(&refs);

        let mut o = ProxyOptions::smtp(mta.addr);
        o.role = "submission".into();
        o.starttls = true;
        o.trusted_loopback = false;
        o.dns_nameserver = Some(dns.nameserver());
        let mut toml = String::new();
        for (domain, ks, canon) in DOMAINS {
            for (_, selector) in ks {
                let k = keys
                    .iter()
                    .find(|k| k.domain == domain && k.selector == *selector)
                    .unwrap();
                toml.push_str(&format!(
                    "[[dkim.sign]]\ndomain = \"{domain}\"\nselector = \"{selector}\"\nkey_file = \"{}\"\ncanonicalization = \"{canon}\"\nexpiry = \"7d\"\n\n",
                    k.file.display()
                ));
            }
        }
        o.extra_toml = vec![toml];
        let proxy = Proxy::start(o).await;
        World {
            dir,
            keys,
            dns,
            mta,
            proxy,
        }
    }

    /// Log in as the domain's user and send `body` from `from`; the final reply.
    async fn send(&self, login_domain: &str, body: &[u8]) -> Reply {
        let mut c = Client::connect(self.proxy.addr).await;
        assert_eq!(c.read_reply().await.code, 220);
        c.ehlo(HELO).await;
        c.starttls().await;
        c.ehlo(HELO).await;
        let u = user(login_domain);
        let r = c
            .cmd(&format!(
                "AUTH PLAIN {}",
                b64(&format!("\0{u}\0{}", password_of(&u)))
            ))
            .await;
        assert_reply(&r, "235", "AUTH");
        assert_reply(&c.cmd(&format!("MAIL FROM:<{u}>")).await, "250", "MAIL");
        assert_reply(&c.cmd("RCPT TO:<bob@example.net>").await, "250", "RCPT");
        assert_reply(&c.cmd("DATA").await, "354", "DATA");
        c.send_raw(&dot_stuff_and_terminate(body)).await;
        let r = c.read_reply().await;
        let _ = c.try_send_raw(b"QUIT\r\n").await;
        r
    }

    /// The message the next hop received whose Message-ID carries `subject`.
    fn captured(&self, subject: &str) -> Vec<u8> {
        let needle = format!("<{subject}@");
        self.mta
            .accepted()
            .into_iter()
            .find(|m| show(&m.data).contains(&needle))
            .unwrap_or_else(|| panic!("{subject}: not at the next hop"))
            .data
    }
}

// ---------------------------------------------------------------------------
// The three verifiers
// ---------------------------------------------------------------------------

const DKIMPY: &str = r#"
import json, sys, dkim
records = json.load(open(sys.argv[1]))
def dns(name, timeout=5):
    return records.get(name.decode().rstrip('.').lower(), '').encode() or None
out = {}
for path in sys.argv[2:]:
    msg = open(path, 'rb').read()
    d = dkim.DKIM(msg)
    n = len([l for l in msg.split(b'\r\n\r\n')[0].split(b'\r\n') if l.lower().startswith(b'dkim-signature:')])
    verdicts = []
    for i in range(n):
        try:
            verdicts.append(bool(d.verify(idx=i, dnsfunc=dns)))
        except dkim.DKIMException as e:
            print(path, i, e, file=sys.stderr)
            verdicts.append(False)
    out[path] = verdicts
print(json.dumps(out))
"#;

/// dkimpy's verdict for every signature of every file.
fn dkimpy(w: &World, files: &[PathBuf]) -> BTreeMap<PathBuf, Vec<bool>> {
    let python = common::python_with(
        "dkim, nacl",
        "dkimpy and PyNaCl: apt-get install python3-dkim python3-nacl",
    );
    let records: BTreeMap<String, String> = w
        .keys
        .iter()
        .map(|k| {
            (
                format!("{}._domainkey.{}", k.selector, k.domain),
                k.txt.clone(),
            )
        })
        .collect();
    let rec_file = w.dir.path().join("records.json");
    std::fs::write(&rec_file, serde_json::to_string(&records).unwrap()).unwrap();
    let script = w.dir.path().join("verify.py");
    std::fs::write(&script, DKIMPY).unwrap();
    let out = Command::new(python)
        .arg(&script)
        .arg(&rec_file)
        .args(files)
        .output()
        .expect("run dkimpy");
    assert!(
        out.status.success(),
        "dkimpy: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let v: BTreeMap<String, Vec<bool>> = serde_json::from_slice(&out.stdout).expect("dkimpy JSON");
    v.into_iter().map(|(k, v)| (PathBuf::from(k), v)).collect()
}

/// OpenDKIM's verdict (libopendkim through opendkim-testmsg, DNS from our server).
fn opendkim(w: &World, file: &Path) -> Result<(), String> {
    let tool = "/usr/sbin/opendkim-testmsg";
    assert!(
        Path::new(tool).exists(),
        "{tool} missing: apt-get install opendkim-tools"
    );
    let resolv = w.dir.path().join("resolv.conf");
    std::fs::write(
        &resolv,
        format!(
            "nameserver {}\noptions attempts:1 timeout:5\n",
            w.dns.addr().ip()
        ),
    )
    .unwrap();
    let script = format!(
        "mount --bind '{}' /etc/resolv.conf && exec {tool} < '{}'",
        resolv.display(),
        file.display()
    );
    let out_dir = tempfile::tempdir().unwrap();
    let mut c = Command::new("unshare");
    c.args(["--mount", "sh", "-c", &script]);
    let done = common::run_bounded_blocking(c, out_dir.path(), CLI_DEADLINE);
    let text = format!("{}{}", done.stdout_text(), done.stderr);
    match done.status {
        Some(s) if s.success() && text.trim().is_empty() => Ok(()),
        status => Err(format!("{status:?}: {}", text.trim())),
    }
}

/// Our own verifier: `mailwarden check --json`, the dkim results.
fn own(w: &World, file: &Path) -> Vec<Value> {
    let config = w.dir.path().join("check.toml");
    std::fs::write(
        &config,
        format!(
            "[dns]\nnameservers = [\"{}\"]\ntimeout_ms = 2000\nattempts = 1\n",
            w.dns.nameserver()
        ),
    )
    .unwrap();
    let mut c = Command::new(bin());
    c.arg("check")
        .arg("--config")
        .arg(&config)
        .args([
            "--ip",
            "192.0.2.10",
            "--helo",
            HELO,
            "--mail-from",
            "x@example.org",
        ])
        .args(["--rcpt", "bob@example.net", "--json"])
        .arg(file);
    let out_dir = tempfile::tempdir().unwrap();
    let done = common::run_bounded_blocking(c, out_dir.path(), CLI_DEADLINE);
    let stdout = done.stdout_text();
    let json: Value = serde_json::from_str(stdout.trim())
        .unwrap_or_else(|e| panic!("check --json: {e}: {stdout} {}", done.stderr));
    json["dkim"].as_array().cloned().unwrap_or_default()
}

fn own_results(entries: &[Value]) -> Vec<String> {
    entries
        .iter()
        .map(|e| e["result"].as_str().unwrap_or("?").to_string())
        .collect()
}

// ---------------------------------------------------------------------------
// Message surgery
// ---------------------------------------------------------------------------

fn split(m: &[u8]) -> (Vec<u8>, Vec<u8>) {
    let at = m
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .expect("header end")
        + 2;
    (m[..at].to_vec(), m[at..].to_vec())
}

/// The DKIM-Signature fields (unfolded text), in order.
fn signatures(m: &[u8]) -> Vec<String> {
    let (head, _) = split(m);
    let text = String::from_utf8_lossy(&head)
        .replace("\r\n\t", "")
        .replace("\r\n ", " ");
    text.lines()
        .filter(|l| l.to_ascii_lowercase().starts_with("dkim-signature:"))
        .map(str::to_string)
        .collect()
}

fn tag(sig: &str, name: &str) -> Option<String> {
    sig.split_once(':')?
        .1
        .split(';')
        .map(str::trim)
        .find_map(|t| t.strip_prefix(&format!("{name}=")).map(str::to_string))
}

/// The message with only the `keep`-th DKIM-Signature (0-based) left: OpenDKIM's tool
/// reports on the message as a whole, so each signature is judged on its own copy.
fn only_signature(m: &[u8], keep: usize) -> Vec<u8> {
    let text = String::from_utf8_lossy(m).to_string();
    let mut out = String::new();
    let mut n = 0;
    let mut skipping = false;
    let mut in_head = true;
    for line in text.split_inclusive("\r\n") {
        if in_head && line == "\r\n" {
            in_head = false;
        }
        if in_head && line.to_ascii_lowercase().starts_with("dkim-signature:") {
            skipping = n != keep;
            n += 1;
        } else if in_head && !line.starts_with([' ', '\t']) {
            skipping = false;
        }
        if !skipping {
            out.push_str(line);
        }
    }
    out.into_bytes()
}

fn replace_once(m: &[u8], from: &str, to: &str) -> Vec<u8> {
    let text = String::from_utf8_lossy(m).to_string();
    assert!(text.contains(from), "{from:?} not in the message");
    text.replacen(from, to, 1).into_bytes()
}

/// Tampered copies that no signature may survive.
fn tampered(m: &[u8], domain: &str) -> Vec<(&'static str, Vec<u8>)> {
    let (head, body) = split(m);
    let mut second_from = head.clone();
    second_from.extend_from_slice(format!("From: ceo@{domain}\r\n").as_bytes());
    second_from.extend_from_slice(&body);
    vec![
        ("body", replace_once(m, "Hello Bob", "Hello Eve")),
        (
            "signed header",
            replace_once(m, "To: Bob <bob", "To: Bob <eve"),
        ),
        ("an added second From (oversigned)", second_from),
        (
            "appended body text",
            [m, b"PS: send money\r\n".as_slice()].concat(),
        ),
    ]
}

// ---------------------------------------------------------------------------
// Tests
// ---------------------------------------------------------------------------

/// Every key and canonicalization: the next hop gets the message signed by the From
/// domain; dkimpy, OpenDKIM and our verifier pass it; tampered copies fail all three;
/// whitespace re-folding passes relaxed/relaxed and fails simple/simple; the dual-signed
/// domain's two signatures each verify; a domain without a key is relayed unsigned.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn signed_mail_verifies_everywhere_and_tampering_fails() {
    within(async {
        let w = World::start().await;
        let mut files: Vec<(String, PathBuf)> = Vec::new();
        for (domain, ks, canon) in DOMAINS {
            let subject = format!("m-{}", domain.replace('.', "-"));
            let r = w.send(domain, &message(&user(domain), &subject)).await;
            assert!(
                r.code == 250 && r.text().contains(RELAYED),
                "{domain}: {}",
                show(&r.raw)
            );
            let got = w.captured(&subject);
            let sigs = signatures(&got);
            if ks.is_empty() {
                assert!(sigs.is_empty(), "{domain} has no key, yet: {sigs:?}");
                let log = w
                    .proxy
                    .wait_log(
                        &format!("unsigned: no key for {domain}"),
                        Duration::from_secs(10),
                    )
                    .await;
                assert!(log.contains("transaction"), "{log}");
                continue;
            }
            assert_eq!(sigs.len(), ks.len(), "{domain}: {sigs:?}");
            for (sig, (algo, selector)) in sigs.iter().zip(ks.iter()) {
                assert_eq!(tag(sig, "d").as_deref(), Some(domain), "{sig}");
                assert_eq!(tag(sig, "s").as_deref(), Some(*selector), "{sig}");
                assert_eq!(tag(sig, "c").as_deref(), Some(canon), "{sig}");
                let a = if *algo == "rsa" {
                    "rsa-sha256"
                } else {
                    "ed25519-sha256"
                };
                assert_eq!(tag(sig, "a").as_deref(), Some(a), "{sig}");
                let (t, x): (u64, u64) = (
                    tag(sig, "t").unwrap().parse().unwrap(),
                    tag(sig, "x").unwrap().parse().unwrap(),
                );
                assert_eq!(x - t, 7 * 86_400, "expiry = 7d: {sig}");
                let h = tag(sig, "h").unwrap().to_ascii_lowercase();
                assert_eq!(
                    h.split(':').filter(|n| n.trim() == "from").count(),
                    2,
                    "From signed and oversigned: {h}"
                );
            }
            let path = w.dir.path().join(format!("{subject}.eml"));
            std::fs::write(&path, &got).unwrap();
            files.push((domain.to_string(), path.clone()));
            for (what, bad) in tampered(&got, domain) {
                let p = w
                    .dir
                    .path()
                    .join(format!("{subject}-tampered-{}.eml", files.len()));
                std::fs::write(&p, bad).unwrap();
                files.push((format!("{domain} tampered: {what}"), p));
            }
            // Re-folded and re-spaced header, trailing spaces dropped in the body: what
            // relaxed canonicalization exists to survive.
            let refolded = replace_once(
                &got,
                "To: Bob <bob@example.net>,\r\n Carol",
                "To:  Bob <bob@example.net>,\r\n\t  Carol",
            );
            let refolded = replace_once(&refolded, "Hello Bob,  \r\n", "Hello Bob,\r\n");
            let p = w.dir.path().join(format!("{subject}-refolded.eml"));
            std::fs::write(&p, refolded).unwrap();
            files.push((format!("{domain} refolded ({canon})"), p));
        }

        let paths: Vec<PathBuf> = files.iter().map(|(_, p)| p.clone()).collect();
        let py = dkimpy(&w, &paths);
        let mut failures = Vec::new();
        for (case, path) in &files {
            let m = std::fs::read(path).unwrap();
            let n = signatures(&m).len();
            // Tampering breaks every signature; re-folding breaks simple/simple only.
            let breaks = case.contains("tampered")
                || (case.contains("refolded") && case.contains("simple/simple"));
            let expect_pass = !breaks;
            // dkimpy: every signature.
            let verdicts = &py[path];
            if verdicts.len() != n || verdicts.iter().any(|&v| v != expect_pass) {
                failures.push(format!(
                    "dkimpy {case}: {verdicts:?} (expected all {expect_pass})"
                ));
            }
            // OpenDKIM: each signature on its own copy.
            for i in 0..n {
                let single = w.dir.path().join(format!(
                    "{}.only{i}",
                    path.file_name().unwrap().to_string_lossy()
                ));
                std::fs::write(&single, only_signature(&m, i)).unwrap();
                let verdict = opendkim(&w, &single);
                if verdict.is_ok() != expect_pass {
                    failures.push(format!(
                        "opendkim {case} signature {i}: {verdict:?} (expected pass: {expect_pass})"
                    ));
                }
            }
            // Ours.
            let results = own_results(&own(&w, path));
            if results.len() != n || results.iter().any(|r| (r == "pass") != expect_pass) {
                failures.push(format!(
                    "mailwarden check {case}: {results:?} (expected all pass: {expect_pass})"
                ));
            }
        }
        assert!(
            failures.is_empty(),
            "{} failures:\n{}",
            failures.len(),
            failures.join("\n")
        );
    })
    .await;
}

/// Runs the binary with `args`; (exit success, stdout + stderr).
fn cli(args: &[&str]) -> (bool, String) {
    let out_dir = tempfile::tempdir().unwrap();
    let mut c = Command::new(bin());
    c.args(args);
    let done = common::run_bounded_blocking(c, out_dir.path(), CLI_DEADLINE);
    (
        done.status.is_some_and(|s| s.success()),
        format!("{}{}", done.stdout_text(), done.stderr),
    )
}

/// An outbound message held by the From check (a user of one domain writing as another
/// signed domain) reaches the next hop only when released, and then signed by its From
/// domain (both keys of the dual domain); `dkim check-dns` confirms the published keys
/// and refuses a record that holds another key, or none.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn released_mail_is_signed_and_check_dns_compares_keys() {
    within(async {
        let w = World::start().await;
        let subject = "held-then-released";
        let body = message("boss@dual.test", subject);
        let r = w.send("rsa-relaxed.test", &body).await;
        assert_reply(&r, "250", "a held message is accepted (quarantined)");
        assert!(
            !r.text().contains(RELAYED),
            "relayed instead of held: {}",
            show(&r.raw)
        );
        assert!(
            w.mta.accepted().is_empty(),
            "nothing may reach the next hop before release"
        );
        let id = r
            .text()
            .rsplit("queued as ")
            .next()
            .unwrap()
            .trim()
            .to_string();
        let config = w.proxy.config_path.to_str().unwrap().to_string();
        let (ok, out) = cli(&["quarantine", "--config", &config, "release", &id]);
        assert!(ok, "release: {out}");
        let got = w.captured(subject);
        let sigs = signatures(&got);
        assert_eq!(sigs.len(), 2, "dual.test signs twice: {sigs:?}");
        assert!(
            sigs.iter()
                .all(|s| tag(s, "d").as_deref() == Some("dual.test")),
            "{sigs:?}"
        );
        let path = w.dir.path().join("released.eml");
        std::fs::write(&path, &got).unwrap();
        let bad = w.dir.path().join("released-tampered.eml");
        std::fs::write(&bad, replace_once(&got, "Hello Bob", "Hello Eve")).unwrap();
        let py = dkimpy(&w, &[path.clone(), bad.clone()]);
        assert_eq!(py[&path], [true, true], "released copy");
        assert_eq!(py[&bad], [false, false], "tampered released copy");
        assert_eq!(own_results(&own(&w, &path)), ["pass", "pass"]);

        // check-dns: every configured key matches what keygen told us to publish.
        for k in &w.keys {
            let (ok, out) = cli(&[
                "dkim",
                "check-dns",
                "--domain",
                k.domain,
                "--selector",
                k.selector,
                "-c",
                &config,
            ]);
            assert!(
                ok && out.starts_with("ok: "),
                "{}/{}: {out}",
                k.domain,
                k.selector
            );
        }
        // Another key published under a configured selector; then nothing at all.
        let stranger = &w
            .keys
            .iter()
            .find(|k| k.domain == "ed-simple.test")
            .unwrap()
            .txt;
        w.dns.update_zone(|z| {
            let mut fresh = Zone::new();
            for k in &w.keys {
                let name = format!("{}._domainkey.{}", k.selector, k.domain);
                if k.domain == "ed-relaxed.test" {
                    fresh = fresh.txt(&name, stranger);
                } else if k.domain != "rsa-simple.test" {
                    fresh = fresh.txt(&name, &k.txt);
                }
            }
            *z = fresh;
        });
        let (ok, out) = cli(&[
            "dkim",
            "check-dns",
            "--domain",
            "ed-relaxed.test",
            "--selector",
            "e1",
            "-c",
            &config,
        ]);
        assert!(!ok && out.contains("NOT the key"), "{out}");
        let (ok, out) = cli(&[
            "dkim",
            "check-dns",
            "--domain",
            "rsa-simple.test",
            "--selector",
            "r1",
            "-c",
            &config,
        ]);
        assert!(!ok && out.contains("no TXT record"), "{out}");
        let (ok, out) = cli(&[
            "dkim",
            "check-dns",
            "--domain",
            "other.test",
            "--selector",
            "r1",
            "-c",
            &config,
        ]);
        assert!(!ok && out.contains("no [[dkim.sign]]"), "{out}");
    })
    .await;
}

/// A key that cannot be used stops the start (and check-config) with the file, the line
/// and the key: missing, world-readable, RSA under 2048 bits, not a key, not a DKIM
/// algorithm (EC). A good key passes.
#[test]
fn bad_keys_are_config_errors_with_file_line_and_key() {
    use std::os::unix::fs::PermissionsExt;
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let good = keygen(d, "example.org", "good", "ed25519").file;
    let openssl = |args: &[&str], out: &Path| {
        // The subcommand, the output, then its options (genrsa wants the size last).
        let st = Command::new("openssl")
            .arg(args[0])
            .arg("-out")
            .arg(out)
            .args(&args[1..])
            .stderr(std::process::Stdio::null())
            .status()
            .expect("openssl (apt-get install openssl)");
        assert!(st.success(), "openssl {args:?}");
        std::fs::set_permissions(out, std::fs::Permissions::from_mode(0o600)).unwrap();
    };
    let weak = d.join("weak.key");
    openssl(
        &[
            "genpkey",
            "-algorithm",
            "RSA",
            "-pkeyopt",
            "rsa_keygen_bits:1024",
        ],
        &weak,
    );
    let ec = d.join("ec.key");
    openssl(
        &[
            "genpkey",
            "-algorithm",
            "EC",
            "-pkeyopt",
            "ec_paramgen_curve:P-256",
        ],
        &ec,
    );
    // OpenDKIM's own format (PKCS#1, `openssl genrsa`, what opendkim-genkey writes) loads.
    let pkcs1 = d.join("pkcs1.key");
    openssl(&["genrsa", "-traditional", "2048"], &pkcs1);
    let open = d.join("open.key");
    std::fs::copy(&good, &open).unwrap();
    std::fs::set_permissions(&open, std::fs::Permissions::from_mode(0o644)).unwrap();
    let junk = d.join("junk.key");
    std::fs::write(&junk, "not a key\n").unwrap();
    std::fs::set_permissions(&junk, std::fs::Permissions::from_mode(0o600)).unwrap();

    let cases: [(&Path, Option<&str>); 7] = [
        (&good, None),
        (&pkcs1, None),
        (&d.join("missing.key"), Some("No such file")),
        (&open, Some("readable or writable by every user")),
        (&weak, Some("too weak")),
        (&ec, Some("not a usable RSA or Ed25519 key")),
        (&junk, Some("no PEM private key")),
    ];
    for (key, expect) in cases {
        let config = d.join("mailwarden.toml");
        // A good entry first, so the bad one is dkim.sign[1], its key_file on line 13.
        std::fs::write(
            &config,
            format!(
                "local_domains = [\"example.org\"]\n[[listener]]\naddress = \"127.0.0.1:2525\"\n\n\
                 [[dkim.sign]]\ndomain = \"example.org\"\nselector = \"good\"\nkey_file = \"{}\"\n\n\
                 [[dkim.sign]]\ndomain = \"example.org\"\nselector = \"other\"\nkey_file = \"{}\"\n",
                good.display(),
                key.display()
            ),
        )
        .unwrap();
        let (ok, out) = cli(&["check-config", "--config", config.to_str().unwrap()]);
        match expect {
            None => assert!(ok, "{}: {out}", key.display()),
            Some(reason) => {
                assert!(!ok, "{}: accepted: {out}", key.display());
                let want = format!("{}:13: dkim.sign[1].key_file: ", config.display());
                assert!(
                    out.contains(&want) && out.contains(reason),
                    "{}: want {want:?} and {reason:?}: {out}",
                    key.display()
                );
            }
        }
    }
}
