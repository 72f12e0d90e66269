//! DKIM interoperability: messages signed by dkimpy (an independent implementation) must
//! verify in `mailwarden check`, tampered copies must fail, and signatures that RFC 8301
//! forbids (rsa-sha1, RSA keys under 1024 bits) must never pass.
//!
//! Needs, besides the binary: `python3` with dkimpy and PyNaCl (Debian: `apt-get install
//! python3-dkim`, which pulls python3-nacl; or `pip install dkimpy pynacl`) and the
//! `openssl` command (RSA key generation). Keys are generated fresh on every run; the
//! public keys are served from the loopback DNS server (tests/common/dns.rs) as
//! `<selector>._domainkey.example.com` TXT records (the RSA-2048 one is longer than 255
//! octets, so it is a multi-string TXT record).

mod common;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::{Mutex, OnceLock};
use std::time::Duration;

use common::dns::{DnsServer, Zone};
use serde_json::{Value, json};

const DOMAIN: &str = "example.com";
const CANONS: [&str; 4] = [
    "simple/simple",
    "simple/relaxed",
    "relaxed/simple",
    "relaxed/relaxed",
];
const WORKERS: usize = 8;
const CASE_DEADLINE: Duration = Duration::from_secs(60);

/// Keys: (name, type, bits, selector).
const KEYS: [(&str, &str, u32, &str); 3] = [
    ("rsa2048", "rsa", 2048, "s"),
    ("ed25519", "ed25519", 0, "ed"),
    ("rsa512", "rsa", 512, "weak"),
];

// ---------------------------------------------------------------------------
// Messages (CRLF, as they travel over SMTP)
// ---------------------------------------------------------------------------

/// Folded headers, trailing whitespace in headers and body, tabs, a trace header that is
/// not signed, and several empty lines at the end of the body.
const MSG_FOLDED: &str = "Received: from mail.example.com (mail.example.com [192.0.2.25])\r\n\
\tby mx.example.org with ESMTPS id 4ABC123\r\n\
\tfor <bob@example.org>; Mon, 13 May 2024 09:12:55 +0000\r\n\
From: Alice Example <alice@example.com>\r\n\
To: Bob Receiver <bob@example.org>,\r\n \
Carol Receiver <carol@example.org>   \r\n\
Subject: Quarterly report: numbers, plans and a\r\n \
rather long subject line that the MUA folded  \r\n\
Date: Mon, 13 May 2024 09:12:50 +0000\r\n\
Message-ID: <20240513091250.4711@mail.example.com>\r\n\
MIME-Version: 1.0\r\n\
Content-Type: text/plain; charset=us-ascii\r\n\
X-Mailer:    Example   Mailer\t 1.0  \r\n\
\r\n\
Hello Bob,   \r\n\
\r\n\
the report is attached.\t\r\n\
\x20 Indented line with  double  spaces.\r\n\
\r\n\
Alice\r\n\
\r\n\
\r\n\
\r\n";

/// 8-bit UTF-8 body, RFC 2047 encoded headers.
const MSG_UTF8_BODY: &str = "From: =?UTF-8?Q?J=C3=BCrgen_M=C3=BCller?= <juergen@example.com>\r\n\
To: bob@example.org\r\n\
Subject: =?UTF-8?B?R3LDvMOfZSBhdXMgTcO8bmNoZW4=?=\r\n\
Date: Tue, 14 May 2024 10:00:00 +0200\r\n\
Message-ID: <utf8-body-1@example.com>\r\n\
MIME-Version: 1.0\r\n\
Content-Type: text/plain; charset=utf-8\r\n\
Content-Transfer-Encoding: 8bit\r\n\
\r\n\
Grüße aus München! Ça va? Ελληνικά, 日本語, emoji 📨.\r\n\
Trailing space after this: \r\n\
Zeile mit Tab\t\r\n\
\r\n\
— Jürgen\r\n";

/// Raw UTF-8 in the header fields (an SMTPUTF8 / RFC 6532 message).
const MSG_UTF8_HEADERS: &str = "From: Jürgen Müller <juergen@example.com>\r\n\
To: Zoë Ångström <zoe@example.org>\r\n\
Subject: Grüße – ünïcödé in a raw header\r\n\
Date: Wed, 15 May 2024 08:30:00 +0000\r\n\
Message-ID: <utf8-headers-1@example.com>\r\n\
MIME-Version: 1.0\r\n\
Content-Type: text/plain; charset=utf-8\r\n\
Content-Transfer-Encoding: 8bit\r\n\
\r\n\
Body with ÿ, ß and 😀.\r\n";

/// multipart/alternative with HTML, a long line, a line starting with a dot and a
/// "From " line.
const MSG_MULTIPART: &str = "From: \"Example Newsletter\" <news@example.com>\r\n\
To: undisclosed-recipients:;\r\n\
Subject: Newsletter #42\r\n\
Date: Thu, 16 May 2024 12:00:00 +0000\r\n\
Message-ID: <newsletter-42@example.com>\r\n\
List-Id: Example News <news.example.com>\r\n\
List-Unsubscribe: <mailto:unsubscribe@example.com?subject=unsubscribe>,\r\n \
<https://example.com/unsubscribe?id=42>\r\n\
MIME-Version: 1.0\r\n\
Content-Type: multipart/alternative;\r\n \
boundary=\"=_boundary_42\"\r\n\
\r\n\
This is a multi-part message in MIME format.\r\n\
\r\n\
--=_boundary_42\r\n\
Content-Type: text/plain; charset=us-ascii\r\n\
Content-Transfer-Encoding: 7bit\r\n\
\r\n\
.a line that starts with a dot\r\n\
From the desk of the editor (a line starting with \"From \")\r\n\
Lorem ipsum dolor sit amet, consectetur adipiscing elit, sed do eiusmod tempor incididunt ut labore et dolore magna aliqua. Ut enim ad minim veniam, quis nostrud exercitation ullamco laboris nisi ut aliquip ex ea commodo consequat. Duis aute irure dolor in reprehenderit in voluptate velit esse cillum dolore eu fugiat nulla pariatur.\r\n\
\r\n\
--=_boundary_42\r\n\
Content-Type: text/html; charset=us-ascii\r\n\
Content-Transfer-Encoding: 7bit\r\n\
\r\n\
<html><body><p>Hello   <b>world</b></p>  \r\n\
</body></html>\r\n\
\r\n\
--=_boundary_42--\r\n\
\r\n";

/// No body at all.
const MSG_EMPTY_BODY: &str = "From: alice@example.com\r\n\
To: bob@example.org\r\n\
Subject: empty body\r\n\
Date: Fri, 17 May 2024 07:00:00 +0000\r\n\
Message-ID: <empty-body@example.com>\r\n\
\r\n";

const MESSAGES: [(&str, &str); 5] = [
    ("folded", MSG_FOLDED),
    ("utf8body", MSG_UTF8_BODY),
    ("utf8headers", MSG_UTF8_HEADERS),
    ("multipart", MSG_MULTIPART),
    ("emptybody", MSG_EMPTY_BODY),
];

// ---------------------------------------------------------------------------
// Signing with dkimpy (child process)
// ---------------------------------------------------------------------------

/// Reads jobs.json from the directory given as argv[1], generates the keys, signs, checks
/// every signature with dkimpy itself and writes manifest.json.
const SIGNER_PY: &str = r#"
import sys, os, json, base64, subprocess
import dkim
import nacl.signing

out = sys.argv[1]
jobs = json.load(open(os.path.join(out, 'jobs.json')))

def openssl(*args):
    return subprocess.run(['openssl', *args], check=True, capture_output=True).stdout

def rsa_key(bits, name):
    pem = os.path.join(out, name + '.pem')
    try:
        openssl('genrsa', '-traditional', '-out', pem, str(bits))
    except subprocess.CalledProcessError:
        openssl('genrsa', '-out', pem, str(bits))  # OpenSSL 1.1 writes PKCS#1 already
    der = openssl('rsa', '-in', pem, '-pubout', '-outform', 'DER')
    return open(pem, 'rb').read(), 'v=DKIM1; k=rsa; p=' + base64.b64encode(der).decode()

def ed_key():
    seed = os.urandom(32)
    sk = nacl.signing.SigningKey(seed)
    pub = base64.b64encode(sk.verify_key.encode()).decode()
    return base64.b64encode(seed), 'v=DKIM1; k=ed25519; p=' + pub

keys = {}
for k in jobs['keys']:
    keys[k['name']] = rsa_key(k['bits'], k['name']) if k['type'] == 'rsa' else ed_key()

dns = {}
for k in jobs['keys']:
    dns['%s._domainkey.%s' % (k['selector'], k['domain'])] = keys[k['name']][1]

def dnsfunc(name, timeout=5):
    n = name.decode() if isinstance(name, bytes) else name
    v = dns.get(n.rstrip('.').lower())
    return v.encode() if v is not None else None

results = {}
for job in jobs['sign']:
    msg = open(os.path.join(out, job['message']), 'rb').read()
    signed = msg
    for s in job['sigs']:
        k = next(k for k in jobs['keys'] if k['name'] == s['key'])
        h, b = s['canon'].split('/')
        sig = dkim.sign(signed, k['selector'].encode(), k['domain'].encode(), keys[s['key']][0],
                        canonicalize=(h.encode(), b.encode()),
                        signature_algorithm=s['alg'].encode(), linesep=b'\r\n')
        signed = sig + signed
    path = os.path.join(out, job['id'] + '.eml')
    open(path, 'wb').write(signed)
    d = dkim.DKIM(signed, minkey=1024)
    verdicts = []
    for i in range(len(job['sigs'])):
        try:
            verdicts.append(bool(d.verify(idx=i, dnsfunc=dnsfunc)))
        except Exception as e:
            verdicts.append('error: %s' % e)
    results[job['id']] = {'file': path, 'dkimpy_verify': verdicts}

json.dump({'dns': dns, 'signed': results}, open(os.path.join(out, 'manifest.json'), 'w'), indent=1)
"#;

fn python() -> String {
    common::python_with(
        "dkim, nacl.signing",
        "dkim_interop needs python3 with dkimpy and PyNaCl: `apt-get install python3-dkim` \
         (Debian; pulls python3-nacl) or `pip install dkimpy pynacl`; and the openssl command",
    )
}

/// One signature to make: key name, algorithm, canonicalisation.
#[derive(Clone, Debug)]
struct Sig {
    key: &'static str,
    alg: &'static str,
    canon: &'static str,
}

impl Sig {
    fn selector(&self) -> &'static str {
        KEYS.iter()
            .find(|k| k.0 == self.key)
            .map(|k| k.3)
            .expect("key")
    }
}

#[derive(Clone, Debug)]
struct Job {
    id: String,
    message: &'static str,
    sigs: Vec<Sig>,
}

struct Fixture {
    _dir: tempfile::TempDir,
    dns: DnsServer,
    config: PathBuf,
    /// id -> (signed file, dkimpy's own verdict per signature)
    signed: BTreeMap<String, (PathBuf, Vec<Value>)>,
    jobs: Vec<Job>,
    dir: PathBuf,
}

fn jobs() -> Vec<Job> {
    let mut jobs = Vec::new();
    for (msg, _) in MESSAGES {
        for canon in CANONS {
            for (key, alg) in [("rsa2048", "rsa-sha256"), ("ed25519", "ed25519-sha256")] {
                jobs.push(Job {
                    id: format!("{msg}-{alg}-{}", canon.replace('/', "-")),
                    message: msg,
                    sigs: vec![Sig { key, alg, canon }],
                });
            }
        }
    }
    // RFC 8463 section 3 deployment: one RSA and one Ed25519 signature on one message.
    jobs.push(Job {
        id: "folded-dual".into(),
        message: "folded",
        sigs: vec![
            Sig {
                key: "rsa2048",
                alg: "rsa-sha256",
                canon: "relaxed/relaxed",
            },
            Sig {
                key: "ed25519",
                alg: "ed25519-sha256",
                canon: "relaxed/relaxed",
            },
        ],
    });
    // RFC 8301: rsa-sha1 and keys under 1024 bits must not verify.
    jobs.push(Job {
        id: "folded-rsa-sha1".into(),
        message: "folded",
        sigs: vec![Sig {
            key: "rsa2048",
            alg: "rsa-sha1",
            canon: "relaxed/relaxed",
        }],
    });
    jobs.push(Job {
        id: "folded-rsa512".into(),
        message: "folded",
        sigs: vec![Sig {
            key: "rsa512",
            alg: "rsa-sha256",
            canon: "relaxed/relaxed",
        }],
    });
    jobs
}

fn fixture() -> &'static Fixture {
    static F: OnceLock<Fixture> = OnceLock::new();
    F.get_or_init(|| {
        let python = python();
        let dir = tempfile::tempdir().expect("tempdir");
        let d = dir.path().to_path_buf();
        for (name, text) in MESSAGES {
            std::fs::write(d.join(format!("{name}.eml")), text).expect("write message");
        }
        let jobs = jobs();
        let spec = json!({
            "keys": KEYS.iter().map(|(name, ty, bits, sel)| json!({
                "name": name, "type": ty, "bits": bits, "selector": sel, "domain": DOMAIN,
            })).collect::<Vec<_>>(),
            "sign": jobs.iter().map(|j| json!({
                "id": j.id,
                "message": format!("{}.eml", j.message),
                "sigs": j.sigs.iter().map(|s| json!({
                    "key": s.key, "alg": s.alg, "canon": s.canon,
                })).collect::<Vec<_>>(),
            })).collect::<Vec<_>>(),
        });
        std::fs::write(d.join("jobs.json"), spec.to_string()).expect("write jobs");
        let script = d.join("sign.py");
        std::fs::write(&script, SIGNER_PY).expect("write signer");
        let out = Command::new(&python)
            .arg(&script)
            .arg(&d)
            .output()
            .expect("run the dkimpy signer");
        assert!(
            out.status.success(),
            "dkimpy signer failed ({}):\n{}\n{}",
            out.status,
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        let manifest: Value =
            serde_json::from_slice(&std::fs::read(d.join("manifest.json")).expect("read manifest"))
                .expect("manifest JSON");

        let mut zone = Zone::new()
            // SPF never passes for the test client: DMARC can only pass through DKIM.
            .txt(DOMAIN, "v=spf1 -all")
            .txt(
                &format!("_dmarc.{DOMAIN}"),
                "v=DMARC1; p=reject; adkim=r; aspf=r",
            );
        for (name, txt) in manifest["dns"].as_object().expect("dns map") {
            zone = zone.txt(name, txt.as_str().expect("TXT value"));
        }
        let dns = DnsServer::start(zone);
        let config = d.join("mailwarden.toml");
        std::fs::write(
            &config,
            format!(
                "[dns]\nnameservers = [\"{}\"]\ntimeout_ms = 2000\nattempts = 1\n",
                dns.nameserver()
            ),
        )
        .expect("write config");
        let signed = manifest["signed"]
            .as_object()
            .expect("signed map")
            .iter()
            .map(|(id, v)| {
                (
                    id.clone(),
                    (
                        PathBuf::from(v["file"].as_str().expect("file")),
                        v["dkimpy_verify"].as_array().expect("verdicts").clone(),
                    ),
                )
            })
            .collect();
        Fixture {
            _dir: dir,
            dns,
            config,
            signed,
            jobs,
            dir: d,
        }
    })
}

// ---------------------------------------------------------------------------
// Running `mailwarden check`
// ---------------------------------------------------------------------------

struct CheckOut {
    json: Option<Value>,
    raw: String,
}

impl CheckOut {
    fn dkim(&self) -> Vec<Value> {
        self.json
            .as_ref()
            .and_then(|j| j["dkim"].as_array().cloned())
            .unwrap_or_default()
    }
}

fn run_check(config: &Path, message: &Path) -> CheckOut {
    let out_dir = tempfile::tempdir().expect("tempdir");
    let mut command = Command::new(common::bin());
    command
        .arg("check")
        .arg("--config")
        .arg(config)
        .args(["--ip", "203.0.113.7", "--helo", "mail.example.com"])
        .args([
            "--mail-from",
            "alice@example.com",
            "--rcpt",
            "bob@example.org",
        ])
        .arg("--json")
        .arg(message);
    let done = common::run_bounded_blocking(command, out_dir.path(), CASE_DEADLINE);
    let (status, stdout, stderr) = (done.status, done.stdout_text(), done.stderr);
    let json = match status {
        Some(st) if st.success() => serde_json::from_str(stdout.trim()).ok(),
        _ => None,
    };
    CheckOut {
        json,
        raw: format!(
            "status {status:?}\nstdout: {}\nstderr: {}",
            stdout.trim(),
            stderr.trim()
        ),
    }
}

/// Run many checks concurrently; results in input order.
fn run_all(config: &Path, files: &[PathBuf]) -> Vec<CheckOut> {
    let next = Mutex::new(0usize);
    let out: Mutex<BTreeMap<usize, CheckOut>> = Mutex::new(BTreeMap::new());
    std::thread::scope(|s| {
        for _ in 0..WORKERS.min(files.len()) {
            s.spawn(|| {
                loop {
                    let i = {
                        let mut n = next.lock().unwrap();
                        *n += 1;
                        *n - 1
                    };
                    let Some(f) = files.get(i) else { break };
                    let r = run_check(config, f);
                    out.lock().unwrap().insert(i, r);
                }
            });
        }
    });
    out.into_inner().unwrap().into_values().collect()
}

/// Header/body split of a message: (headers incl. the blank line, body).
fn split_message(m: &[u8]) -> (Vec<u8>, Vec<u8>) {
    let pos = common::find(m, b"\r\n\r\n").expect("header/body separator") + 4;
    (m[..pos].to_vec(), m[pos..].to_vec())
}

/// A copy with one line inserted at the top of the body.
fn tamper_body(m: &[u8]) -> Vec<u8> {
    let (h, b) = split_message(m);
    let mut out = h;
    out.extend_from_slice(b"Injected line that was not signed.\r\n");
    out.extend_from_slice(&b);
    out
}

/// A copy whose (signed) Subject field was changed.
fn tamper_subject(m: &[u8]) -> Vec<u8> {
    let (h, b) = split_message(m);
    let pos = common::find(&h, b"\r\nSubject: ").expect("Subject field") + 11;
    let mut out = h[..pos].to_vec();
    out.extend_from_slice(b"[changed] ");
    out.extend_from_slice(&h[pos..]);
    out.extend_from_slice(&b);
    out
}

fn to_lf(m: &[u8]) -> Vec<u8> {
    String::from_utf8_lossy(m)
        .replace("\r\n", "\n")
        .into_bytes()
}

fn describe(entries: &[Value]) -> String {
    serde_json::to_string(entries).unwrap_or_default()
}

/// The dkim entry for `selector`, if any.
fn entry<'a>(entries: &'a [Value], selector: &str) -> Option<&'a Value> {
    entries
        .iter()
        .find(|e| e["selector"].as_str() == Some(selector))
}

// ---------------------------------------------------------------------------
// Tests
// ---------------------------------------------------------------------------

/// Every message signed by dkimpy (RSA-2048 and Ed25519, all four canonicalisation
/// combinations, plus a dual-signed message and LF-only copies) verifies.
#[test]
fn dkimpy_signatures_pass() {
    let f = fixture();
    let mut files = Vec::new();
    let mut cases: Vec<(String, Job)> = Vec::new();
    for job in f.jobs.iter().filter(|j| {
        j.sigs
            .iter()
            .all(|s| s.alg != "rsa-sha1" && s.key != "rsa512")
    }) {
        let (file, verdicts) = &f.signed[&job.id];
        assert!(
            verdicts.iter().all(|v| v == &Value::Bool(true)),
            "{}: dkimpy cannot verify its own signature: {verdicts:?}",
            job.id
        );
        files.push(file.clone());
        cases.push((job.id.clone(), job.clone()));
    }
    // LF-only copies (check accepts LF line endings; DKIM is computed over CRLF).
    for id in [
        "folded-rsa-sha256-simple-simple",
        "utf8body-ed25519-sha256-relaxed-relaxed",
    ] {
        let (file, _) = &f.signed[id];
        let lf = f.dir.join(format!("{id}-lf.eml"));
        std::fs::write(&lf, to_lf(&std::fs::read(file).unwrap())).unwrap();
        files.push(lf);
        let job = f.jobs.iter().find(|j| j.id == id).unwrap().clone();
        cases.push((format!("{id} (LF line endings)"), job));
    }

    let outs = run_all(&f.config, &files);
    let mut failures = Vec::new();
    for ((name, job), out) in cases.iter().zip(&outs) {
        let entries = out.dkim();
        let mut problems = Vec::new();
        if out.json.is_none() {
            problems.push(format!("no JSON: {}", out.raw));
        }
        if entries.len() != job.sigs.len() {
            problems.push(format!(
                "{} dkim entries for {} signatures",
                entries.len(),
                job.sigs.len()
            ));
        }
        for s in &job.sigs {
            match entry(&entries, s.selector()) {
                None => problems.push(format!("no entry for selector {}", s.selector())),
                Some(e) => {
                    if e["result"] != "pass" {
                        problems.push(format!("s={} result {}", s.selector(), e["result"]));
                    }
                    if e["algorithm"] != s.alg {
                        problems.push(format!(
                            "s={} algorithm {} (expected {})",
                            s.selector(),
                            e["algorithm"],
                            s.alg
                        ));
                    }
                    if e["domain"] != DOMAIN {
                        problems.push(format!("s={} domain {}", s.selector(), e["domain"]));
                    }
                }
            }
        }
        if !problems.is_empty() {
            failures.push(format!(
                "{name}: {}\n    dkim: {}",
                problems.join("; "),
                describe(&entries)
            ));
        }
    }
    eprintln!(
        "dkimpy-signed messages: {}/{} verified as expected",
        cases.len() - failures.len(),
        cases.len()
    );
    assert!(
        failures.is_empty(),
        "{} of {} signed messages did not verify:\n{}",
        failures.len(),
        cases.len(),
        failures.join("\n")
    );
}

/// A changed body or a changed signed header field gives `fail` for every signature.
#[test]
fn tampered_copies_fail() {
    let f = fixture();
    let mut files = Vec::new();
    let mut cases = Vec::new();
    for job in f.jobs.iter().filter(|j| {
        j.sigs
            .iter()
            .all(|s| s.alg != "rsa-sha1" && s.key != "rsa512")
    }) {
        let (file, _) = &f.signed[&job.id];
        let signed = std::fs::read(file).unwrap();
        for (what, bytes) in [
            ("body changed", tamper_body(&signed)),
            ("Subject changed", tamper_subject(&signed)),
        ] {
            let p = f
                .dir
                .join(format!("{}-{}.eml", job.id, what.replace(' ', "-")));
            std::fs::write(&p, bytes).unwrap();
            files.push(p);
            cases.push((format!("{} ({what})", job.id), job.clone()));
        }
    }
    let outs = run_all(&f.config, &files);
    let mut failures = Vec::new();
    for ((name, job), out) in cases.iter().zip(&outs) {
        let entries = out.dkim();
        let mut problems = Vec::new();
        if out.json.is_none() {
            problems.push(format!("no JSON: {}", out.raw));
        }
        for s in &job.sigs {
            match entry(&entries, s.selector()) {
                None => problems.push(format!("no entry for selector {}", s.selector())),
                Some(e) if e["result"] != "fail" => {
                    problems.push(format!("s={} result {}", s.selector(), e["result"]))
                }
                Some(_) => {}
            }
        }
        if !problems.is_empty() {
            failures.push(format!(
                "{name}: {}\n    dkim: {}",
                problems.join("; "),
                describe(&entries)
            ));
        }
    }
    eprintln!(
        "tampered copies: {}/{} failed as expected",
        cases.len() - failures.len(),
        cases.len()
    );
    assert!(
        failures.is_empty(),
        "{} of {} tampered copies were not `fail`:\n{}",
        failures.len(),
        cases.len(),
        failures.join("\n")
    );
}

/// RFC 8301: rsa-sha1 signatures and RSA keys shorter than 1024 bits never pass (both are
/// otherwise valid: dkimpy verifies the sha1 one).
#[test]
fn rfc8301_weak_signatures_do_not_pass() {
    let f = fixture();
    let ids = ["folded-rsa-sha1", "folded-rsa512"];
    let files: Vec<PathBuf> = ids.iter().map(|id| f.signed[*id].0.clone()).collect();
    assert_eq!(
        f.signed["folded-rsa-sha1"].1,
        vec![Value::Bool(true)],
        "the rsa-sha1 signature is cryptographically valid (dkimpy)"
    );
    let outs = run_all(&f.config, &files);
    let mut failures = Vec::new();
    for ((id, out), (sel, alg)) in ids
        .iter()
        .zip(&outs)
        .zip([("s", "rsa-sha1"), ("weak", "rsa-sha256")])
    {
        let entries = out.dkim();
        match entry(&entries, sel) {
            None => failures.push(format!(
                "{id}: no dkim entry for s={sel}: {}\n{}",
                describe(&entries),
                out.raw
            )),
            Some(e) => {
                if e["result"] == "pass" {
                    failures.push(format!("{id}: passed: {e}"));
                }
                if e["algorithm"] != alg {
                    failures.push(format!(
                        "{id}: algorithm {} (expected {alg})",
                        e["algorithm"]
                    ));
                }
                eprintln!("{id}: dkim {e}");
            }
        }
        if let Some(j) = &out.json
            && j["dmarc"]["result"] == "pass"
        {
            failures.push(format!(
                "{id}: DMARC passed on a weak signature: {}",
                j["dmarc"]
            ));
        }
    }
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}

/// A passing dkimpy signature of the From domain makes DMARC pass (SPF fails here), and
/// a tampered one makes it fail with the domain's reject policy.
#[test]
fn dkim_alignment_drives_dmarc() {
    let f = fixture();
    let (file, _) = &f.signed["folded-ed25519-sha256-relaxed-relaxed"];
    let signed = std::fs::read(file).unwrap();
    let tampered = f.dir.join("dmarc-tampered.eml");
    std::fs::write(&tampered, tamper_body(&signed)).unwrap();
    let outs = run_all(&f.config, &[file.clone(), tampered]);
    let good = outs[0]
        .json
        .as_ref()
        .unwrap_or_else(|| panic!("{}", outs[0].raw));
    let bad = outs[1]
        .json
        .as_ref()
        .unwrap_or_else(|| panic!("{}", outs[1].raw));
    assert_eq!(good["spf"]["mail_from"]["result"], "fail", "{good}");
    assert_eq!(good["dmarc"]["result"], "pass", "{good}");
    assert_eq!(bad["dmarc"]["result"], "fail", "{bad}");
    assert_eq!(bad["dmarc"]["policy"], "reject", "{bad}");
    assert_eq!(bad["verdict"], "reject", "{bad}");
    assert!(f.dns.query_count() > 0);
}
