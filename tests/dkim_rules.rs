//! The DKIM verifier MUSTs of RFC 6376 §3 to §6 and RFC 8463, `l=`, and the bounded work
//! per message (issue 11), each shown on messages signed by dkimpy (an independent
//! implementation): through `mailwarden check --json` against the loopback DNS server,
//! and the ones an attacker would use to get a spoof delivered through the real proxy,
//! down to the final SMTP answer.
//!
//! The signer (Python, dkimpy's `gen_header`) signs whatever tag list a case gives it:
//! tags RFC 6376 forbids, tags in any order, `x=`/`t=` relative to now, an `l=` shorter
//! than the body. Each rule has a control case signed the same way that passes, so a
//! refusal is the rule's doing, not the signer's.
//!
//! Needs what tests/dkim_interop.rs needs: python3 with dkimpy and PyNaCl (Debian
//! `python3-dkim`) and the `openssl` command.

mod common;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::{Mutex, OnceLock};
use std::time::Duration;

use common::dns::{DnsServer, Zone};
use common::fake_mta::{FakeMta, Script};
use common::smtp_client::assert_reply;
use common::{Proxy, ProxyOptions};
use serde_json::{Value, json};

const DOMAIN: &str = "example.com";
/// A `p=none` domain: its mail is delivered whatever DKIM says, so the
/// Authentication-Results the next hop gets can be read.
const LAX: &str = "lax.example";
const WORKERS: usize = 6;
const CASE_DEADLINE: Duration = Duration::from_secs(60);

/// The message every case signs (From in `from_domain`).
fn message(from_domain: &str) -> String {
    format!(
        "From: Alice <alice@{from_domain}>\r\n\
To: Bob <user@example.org>\r\n\
Subject: Quarterly numbers\r\n\
Date: Mon, 13 May 2024 09:12:50 +0000\r\n\
Message-ID: <rules-1@{from_domain}>\r\n\
MIME-Version: 1.0\r\n\
Content-Type: text/plain; charset=us-ascii\r\n\
\r\n\
Hello Bob,\r\n\
\r\n\
the numbers are  in.   \r\n\
\r\n\
Alice\r\n"
    )
}

/// What a spoofer appends after an `l=` signature.
const APPENDED: &str = "\r\nURGENT: wire the money to IBAN XX00 0000 today.\r\n";

const SIGNER_PY: &str = r#"
import sys, os, json, base64, subprocess, time, re
import dkim
from dkim.crypto import HASH_ALGORITHMS, parse_pem_private_key
import nacl.signing, nacl.encoding

out = sys.argv[1]
jobs = json.load(open(os.path.join(out, 'jobs.json')))

def openssl(*args):
    return subprocess.run(['openssl', *args], check=True, capture_output=True).stdout

pem = os.path.join(out, 'rsa.pem')
try:
    openssl('genrsa', '-traditional', '-out', pem, '2048')
except subprocess.CalledProcessError:
    openssl('genrsa', '-out', pem, '2048')
rsa_priv = open(pem, 'rb').read()
rsa_pub = base64.b64encode(openssl('rsa', '-in', pem, '-pubout', '-outform', 'DER')).decode()
seed = os.urandom(32)
ed = nacl.signing.SigningKey(seed)
ed_pub = base64.b64encode(ed.verify_key.encode()).decode()
now = int(time.time())

def expand(v, body_len):
    v = v.replace('$len', str(body_len))
    m = re.fullmatch(r'\$now([+-]\d+)?', v)
    if m:
        v = str(now + int(m.group(1) or 0))
    return v

files = {}
for job in jobs['sign']:
    msg = job['message'].encode()
    alg = job['alg'].encode()
    d = dkim.DKIM(msg, linesep=b'\r\n')
    d.signature_algorithm = alg
    d.hasher = HASH_ALGORITHMS[alg]
    policy = dkim.CanonicalizationPolicy.from_c_value(b'relaxed/relaxed')
    body = policy.canonicalize_body(d.body)
    limit = job.get('body_limit')
    hashed = body if limit is None else body[:limit]
    bh = base64.b64encode(HASH_ALGORITHMS[alg](hashed).digest()).decode()
    fields = []
    include = ()
    for k, v in job['fields']:
        v = bh if v == '$bh' else expand(v, len(body))
        if k == 'h':
            include = tuple(x.strip().lower().encode() for x in v.split(':'))
        fields.append((k.encode(), v.encode()))
    fields.append((b'b', b'0' * 60))
    if alg.startswith(b'rsa'):
        pk = parse_pem_private_key(rsa_priv)
    else:
        pk = nacl.signing.SigningKey(base64.b64encode(seed), encoder=nacl.encoding.Base64Encoder)
    header = d.gen_header(fields, include, policy, b'DKIM-Signature', pk)
    signed = b'DKIM-Signature: ' + header + msg + job.get('append', '').encode()
    path = os.path.join(out, job['id'] + '.eml')
    open(path, 'wb').write(signed)
    files[job['id']] = path

json.dump({'rsa': rsa_pub, 'ed25519': ed_pub, 'files': files},
          open(os.path.join(out, 'manifest.json'), 'w'), indent=1)
"#;

fn python() -> String {
    common::python_with(
        "dkim, nacl.signing",
        "dkim_rules needs python3 with dkimpy and PyNaCl (`apt-get install python3-dkim`)",
    )
}

// ---------------------------------------------------------------------------
// Cases
// ---------------------------------------------------------------------------

/// One message to sign and what `check` must say about its (first) signature.
#[derive(Clone, Debug)]
struct Case {
    id: &'static str,
    /// rsa-sha256 (key "rsa") or ed25519-sha256 (key "ed25519").
    alg: &'static str,
    from_domain: &'static str,
    fields: Vec<(&'static str, String)>,
    /// Hash only this many canonical body octets (for `l=` cases).
    body_limit: Option<usize>,
    append: &'static str,
    /// Expected result word, a piece of the reason, and `header.d`.
    result: &'static str,
    reason: Option<&'static str>,
    domain: &'static str,
}

/// The tags dkimpy would write, for `selector` at `d`.
fn tags(alg: &str, d: &str, selector: &str) -> Vec<(&'static str, String)> {
    vec![
        ("v", "1".into()),
        ("a", alg.into()),
        ("c", "relaxed/relaxed".into()),
        ("d", d.into()),
        ("s", selector.into()),
        ("t", "$now".into()),
        ("h", "from : to : subject : date".into()),
        ("bh", "$bh".into()),
    ]
}

fn set(
    mut fields: Vec<(&'static str, String)>,
    tag: &'static str,
    value: &str,
) -> Vec<(&'static str, String)> {
    match fields.iter_mut().find(|(t, _)| *t == tag) {
        Some(f) => f.1 = value.into(),
        None => fields.insert(fields.len() - 1, (tag, value.into())),
    }
    fields
}

fn without(fields: Vec<(&'static str, String)>, tag: &str) -> Vec<(&'static str, String)> {
    fields.into_iter().filter(|(t, _)| *t != tag).collect()
}

fn case(
    id: &'static str,
    selector: &str,
    result: &'static str,
    reason: Option<&'static str>,
) -> Case {
    Case {
        id,
        alg: "rsa-sha256",
        from_domain: DOMAIN,
        fields: tags("rsa-sha256", DOMAIN, selector),
        body_limit: None,
        append: "",
        result,
        reason,
        domain: DOMAIN,
    }
}

fn cases() -> Vec<Case> {
    let ed = |id, selector, result, reason| Case {
        alg: "ed25519-sha256",
        fields: tags("ed25519-sha256", DOMAIN, selector),
        ..case(id, selector, result, reason)
    };
    let with = |c: Case, tag, value: &str| Case {
        fields: set(c.fields.clone(), tag, value),
        ..c
    };
    let mut v = vec![
        // Controls: the signer's ordinary signatures pass.
        case("control-rsa", "s", "pass", None),
        ed("control-ed25519", "ed", "pass", None),
        // §5.4 / §6.1.1: From must be signed.
        with(
            case("from-not-signed", "s", "permerror", Some("From not signed")),
            "h",
            "to : subject : date",
        ),
        with(
            case(
                "from-lookalike-not-signed",
                "s",
                "permerror",
                Some("From not signed"),
            ),
            "h",
            "x-from : resent-from : to",
        ),
        with(
            case("from-uppercase-signed", "s", "pass", None),
            "h",
            "FROM : To",
        ),
        // §3.6.1 key record tags.
        case(
            "key-h-sha1-vs-rsa-sha256",
            "sha1only",
            "permerror",
            Some("h= does not allow"),
        ),
        case("key-h-sha256", "sha256only", "pass", None),
        case(
            "key-k-ed25519-vs-rsa",
            "kmismatch",
            "permerror",
            Some("key type (k=) does not match a="),
        ),
        ed(
            "ed25519-sig-vs-rsa-key",
            "s",
            "permerror",
            Some("key type (k=) does not match a="),
        ),
        case(
            "key-s-not-email",
            "notemail",
            "permerror",
            Some("not for email (s=)"),
        ),
        case("key-s-email", "emailonly", "pass", None),
        with(
            case("key-t-s-subdomain-i", "strict", "permerror", Some("t=s")),
            "i",
            "alice@mail.example.com",
        ),
        with(
            case("key-t-s-same-i", "strict", "pass", None),
            "i",
            "alice@example.com",
        ),
        case(
            "key-t-y-testing",
            "testing",
            "pass",
            Some("testing mode (t=y)"),
        ),
        case("key-unknown-tags", "unknowntags", "pass", None),
        case(
            "key-v-not-first",
            "vlate",
            "permerror",
            Some("v= is not first"),
        ),
        case(
            "key-revoked",
            "revoked",
            "permerror",
            Some("key revoked (empty p=)"),
        ),
        case(
            "key-garbage",
            "garbage",
            "permerror",
            Some("unusable public key"),
        ),
        case(
            "key-nxdomain",
            "missing",
            "permerror",
            Some("no key record"),
        ),
        case("key-no-txt", "notxt", "permerror", Some("no key record")),
        case(
            "key-not-a-key-record",
            "notakey",
            "permerror",
            Some("key record: tag without '='"),
        ),
        case("key-servfail", "broken", "temperror", Some("DNS error")),
        // §3.5 / §6.1.1 signature tags.
        with(
            case("i-outside-d", "s", "permerror", Some("i= is not within d=")),
            "i",
            "alice@example.com.evil.example",
        ),
        with(
            case("i-subdomain", "s", "pass", None),
            "i",
            "alice@mail.example.com",
        ),
        with(
            with(
                case("x-expired", "s", "permerror", Some("expired")),
                "t",
                "$now-200",
            ),
            "x",
            "$now-100",
        ),
        with(
            with(
                case(
                    "x-not-after-t",
                    "s",
                    "permerror",
                    Some("x= is not after t="),
                ),
                "t",
                "$now+60",
            ),
            "x",
            "$now+30",
        ),
        with(
            with(case("x-future", "s", "pass", None), "t", "$now-10"),
            "x",
            "$now+3600",
        ),
        with(
            case("t-future", "s", "permerror", Some("t= is in the future")),
            "t",
            "$now+3600",
        ),
        with(
            case("t-within-clock-skew", "s", "pass", None),
            "t",
            "$now+60",
        ),
        with(
            with(
                case("unknown-signature-tags", "s", "pass", None),
                "foo",
                "bar",
            ),
            "zz9",
            "ignored",
        ),
        with(case("v-2", "s", "permerror", Some("v= is not 1")), "v", "2"),
        Case {
            fields: without(tags("rsa-sha256", DOMAIN, "s"), "v"),
            ..case("v-missing", "s", "permerror", Some("no v="))
        },
        Case {
            // A second d= after the first: the tag list is invalid (§3.2), d= is kept.
            fields: {
                let mut f = tags("rsa-sha256", DOMAIN, "s");
                f.push(("d", "evil.example".into()));
                f
            },
            ..case("duplicate-d", "s", "permerror", Some("duplicate tag d="))
        },
        // l= (§3.5, RFC 8601 §2.7.1 policy).
        with(case("l-whole-body", "s", "pass", None), "l", "$len"),
    ];
    let appended = |id, from_domain: &'static str, limit: usize, l: &str| Case {
        from_domain,
        fields: set(tags("rsa-sha256", from_domain, "s"), "l", l),
        body_limit: Some(limit),
        append: APPENDED,
        domain: from_domain,
        ..case(id, "s", "policy", Some("unsigned octets appended"))
    };
    v.push(Case {
        reason: Some("body length limit: 51 unsigned octets appended"),
        ..appended("l-appended", DOMAIN, usize::MAX, "$len")
    });
    v.push(appended("l-appended-lax", LAX, usize::MAX, "$len"));
    v.push(Case {
        reason: Some("body length limit: 95 unsigned octets appended"),
        ..appended("l-zero", DOMAIN, 0, "0")
    });
    v.push(Case {
        body_limit: Some(10),
        append: "",
        reason: Some("body length limit: 34 unsigned octets appended"),
        ..appended("l-short", DOMAIN, 10, "10")
    });
    v
}

// ---------------------------------------------------------------------------
// Fixture: keys, signed files, DNS
// ---------------------------------------------------------------------------

struct Fixture {
    _dir: tempfile::TempDir,
    dns: DnsServer,
    dir: PathBuf,
    config: PathBuf,
    files: BTreeMap<String, PathBuf>,
    cases: Vec<Case>,
}

/// Key records, by selector, with `{rsa}` / `{ed}` standing for the public keys.
const RECORDS: [(&str, &str); 13] = [
    ("s", "v=DKIM1; k=rsa; p={rsa}"),
    ("ed", "v=DKIM1; k=ed25519; p={ed}"),
    ("sha1only", "v=DKIM1; k=rsa; h=sha1; p={rsa}"),
    ("sha256only", "v=DKIM1; k=rsa; h=sha256; p={rsa}"),
    ("kmismatch", "v=DKIM1; k=ed25519; p={ed}"),
    ("notemail", "v=DKIM1; k=rsa; s=tlsrpt; p={rsa}"),
    ("emailonly", "v=DKIM1; k=rsa; s=email; p={rsa}"),
    ("strict", "v=DKIM1; k=rsa; t=s; p={rsa}"),
    ("testing", "v=DKIM1; k=rsa; t=y; p={rsa}"),
    (
        "unknowntags",
        "v=DKIM1; k=rsa; n=notes; zz=top; p={rsa}; x2=1",
    ),
    ("vlate", "k=rsa; v=DKIM1; p={rsa}"),
    ("revoked", "v=DKIM1; k=rsa; p="),
    ("garbage", "v=DKIM1; k=rsa; p=Tm90IGEga2V5IGF0IGFsbA=="),
];

fn fixture() -> &'static Fixture {
    static F: OnceLock<Fixture> = OnceLock::new();
    F.get_or_init(|| {
        let python = python();
        let dir = tempfile::tempdir().expect("tempdir");
        let d = dir.path().to_path_buf();
        let cases = cases();
        let spec = json!({
            "sign": cases.iter().map(|c| {
                let mut j = json!({
                    "id": c.id,
                    "message": message(c.from_domain),
                    "alg": c.alg,
                    "fields": c.fields.iter().map(|(k, v)| json!([k, v])).collect::<Vec<_>>(),
                    "append": c.append,
                });
                if let Some(l) = c.body_limit.filter(|&l| l != usize::MAX) {
                    j["body_limit"] = json!(l);
                }
                j
            }).collect::<Vec<_>>(),
        });
        std::fs::write(d.join("jobs.json"), spec.to_string()).expect("write jobs");
        std::fs::write(d.join("sign.py"), SIGNER_PY).expect("write signer");
        let out = Command::new(&python)
            .arg(d.join("sign.py"))
            .arg(&d)
            .output()
            .expect("run the dkimpy signer");
        assert!(
            out.status.success(),
            "dkimpy signer failed:\n{}\n{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        let manifest: Value =
            serde_json::from_slice(&std::fs::read(d.join("manifest.json")).expect("manifest"))
                .expect("manifest JSON");
        let (rsa, ed) = (
            manifest["rsa"].as_str().expect("rsa key"),
            manifest["ed25519"].as_str().expect("ed key"),
        );
        let fill = |t: &str| t.replace("{rsa}", rsa).replace("{ed}", ed);
        let mut zone = Zone::new()
            // SPF never passes for the client: DMARC can only pass through DKIM.
            .txt(DOMAIN, "v=spf1 -all")
            .txt(&format!("_dmarc.{DOMAIN}"), "v=DMARC1; p=reject")
            .txt(LAX, "v=spf1 -all")
            .txt(&format!("_dmarc.{LAX}"), "v=DMARC1; p=none")
            .txt(
                &format!("s._domainkey.{LAX}"),
                &fill("v=DKIM1; k=rsa; p={rsa}"),
            )
            .servfail(&format!("broken._domainkey.{DOMAIN}"))
            .a(&format!("notxt._domainkey.{DOMAIN}"), "192.0.2.1")
            .txt(&format!("notakey._domainkey.{DOMAIN}"), "hello world");
        for (selector, record) in RECORDS {
            zone = zone.txt(&format!("{selector}._domainkey.{DOMAIN}"), &fill(record));
        }
        let dns = DnsServer::start(zone);
        let config = write_config(&d, "default", &dns, "");
        let files = manifest["files"]
            .as_object()
            .expect("files")
            .iter()
            .map(|(id, p)| (id.clone(), PathBuf::from(p.as_str().expect("path"))))
            .collect();
        Fixture {
            _dir: dir,
            dns,
            dir: d,
            config,
            files,
            cases,
        }
    })
}

/// A `check` config using `dns`, with `auth` lines added to `[auth]`.
fn write_config(dir: &Path, name: &str, dns: &DnsServer, auth: &str) -> PathBuf {
    let path = dir.join(format!("{name}.toml"));
    std::fs::write(
        &path,
        format!(
            "[dns]\nnameservers = [\"{}\"]\ntimeout_ms = 2000\nattempts = 1\n[auth]\n{auth}\n",
            dns.nameserver()
        ),
    )
    .expect("write config");
    path
}

// ---------------------------------------------------------------------------
// Running `mailwarden check`
// ---------------------------------------------------------------------------

struct CheckOut {
    json: Value,
    raw: String,
}

fn run_check(config: &Path, message: &Path, mail_from: &str) -> CheckOut {
    let out_dir = tempfile::tempdir().expect("tempdir");
    let mut command = Command::new(common::bin());
    command
        .arg("check")
        .arg("--config")
        .arg(config)
        .args(["--ip", "203.0.113.7", "--helo", "mail.example.com"])
        .args([
            "--mail-from",
            mail_from,
            "--rcpt",
            "user@example.org",
            "--json",
        ])
        .arg(message);
    let done = common::run_bounded_blocking(command, out_dir.path(), CASE_DEADLINE);
    let stdout = done.stdout_text();
    let raw = format!(
        "status {:?}\nstdout: {}\nstderr: {}",
        done.status,
        stdout.trim(),
        done.stderr.trim()
    );
    let json =
        serde_json::from_str(stdout.trim()).unwrap_or_else(|e| panic!("no JSON ({e}): {raw}"));
    CheckOut { json, raw }
}

fn run_all(config: &Path, jobs: &[(PathBuf, String)]) -> Vec<CheckOut> {
    let next = Mutex::new(0usize);
    let out: Mutex<BTreeMap<usize, CheckOut>> = Mutex::new(BTreeMap::new());
    std::thread::scope(|s| {
        for _ in 0..WORKERS.min(jobs.len()) {
            s.spawn(|| {
                loop {
                    let i = {
                        let mut n = next.lock().unwrap();
                        *n += 1;
                        *n - 1
                    };
                    let Some((file, from)) = jobs.get(i) else {
                        break;
                    };
                    let r = run_check(config, file, from);
                    out.lock().unwrap().insert(i, r);
                }
            });
        }
    });
    out.into_inner().unwrap().into_values().collect()
}

/// Each case's first DKIM result: its word, reason and domain as expected. A result
/// other than pass never makes DMARC pass for the p=reject domain.
#[test]
fn each_rule_through_check() {
    let f = fixture();
    let jobs: Vec<(PathBuf, String)> = f
        .cases
        .iter()
        .map(|c| (f.files[c.id].clone(), format!("alice@{}", c.from_domain)))
        .collect();
    let outs = run_all(&f.config, &jobs);
    let mut failures = Vec::new();
    for (c, out) in f.cases.iter().zip(&outs) {
        let dkim = &out.json["dkim"][0];
        let got = dkim["result"].as_str().unwrap_or("(none)");
        let reason = dkim["reason"].as_str().unwrap_or("");
        if got != c.result {
            failures.push(format!("{}: {got} (expected {}): {dkim}", c.id, c.result));
        }
        match c.reason {
            Some(want) if !reason.contains(want) => {
                failures.push(format!("{}: reason {reason:?} lacks {want:?}", c.id))
            }
            None if !reason.is_empty() => {
                failures.push(format!("{}: unexpected reason {reason:?}", c.id))
            }
            _ => {}
        }
        if dkim["domain"] != c.domain {
            failures.push(format!(
                "{}: domain {} (expected {})",
                c.id, dkim["domain"], c.domain
            ));
        }
        let dmarc = out.json["dmarc"]["result"].as_str().unwrap_or("");
        if c.from_domain == DOMAIN {
            let want = match c.result {
                "pass" => "pass",
                "temperror" => "temperror",
                _ => "fail",
            };
            if dmarc != want {
                failures.push(format!(
                    "{}: dmarc {dmarc} (expected {want})\n{}",
                    c.id, out.raw
                ));
            }
        }
        if c.result == "policy" {
            // The A-R names the result and says why, in a comment.
            let ar = out.json["authentication_results"].as_str().unwrap_or("");
            let want = format!("dkim=policy ({}) header.d={} header.s=s", reason, c.domain);
            if !ar.contains(&want) {
                failures.push(format!("{}: A-R lacks {want:?}: {ar}", c.id));
            }
        }
    }
    assert!(
        failures.is_empty(),
        "{} of {} cases wrong:\n{}",
        failures.len(),
        f.cases.len(),
        failures.join("\n")
    );
}

/// Hand-written signatures that cannot be parsed: permerror, and `d=`/`s=` are kept
/// whenever they parse (a signature must not vanish, nor lose its domain).
#[test]
fn malformed_signatures_keep_their_domain() {
    let f = fixture();
    let body = message(DOMAIN);
    let cases = [
        (
            "no-b",
            "v=1; a=rsa-sha256; d=example.com; s=s; h=from; bh=AAAA",
            "no b=",
        ),
        (
            "bad-algorithm",
            "v=1; a=rsa-md5; d=example.com; s=s; h=from; bh=AAAA; b=AAAA",
            "malformed signature",
        ),
        (
            "syntax",
            "v=1; d=example.com; s=s; a=rsa-sha256;; h=from; bh=AAAA; b=AAAA",
            "empty tag",
        ),
        (
            "bad-number",
            "v=1; a=rsa-sha256; d=example.com; s=s; h=from; l=12e3; bh=AAAA; b=AAAA",
            "l= is not a number",
        ),
    ];
    let jobs: Vec<(PathBuf, String)> = cases
        .iter()
        .map(|(id, sig, _)| {
            let path = f.dir.join(format!("malformed-{id}.eml"));
            std::fs::write(&path, format!("DKIM-Signature: {sig}\r\n{body}")).expect("write");
            (path, format!("alice@{DOMAIN}"))
        })
        .collect();
    for ((id, _, want), out) in cases.iter().zip(run_all(&f.config, &jobs)) {
        let dkim = &out.json["dkim"][0];
        assert_eq!(dkim["result"], "permerror", "{id}: {}", out.raw);
        assert!(
            dkim["reason"].as_str().unwrap_or("").contains(want),
            "{id}: {dkim}"
        );
        assert_eq!(dkim["domain"], DOMAIN, "{id}: {dkim}");
        assert_eq!(dkim["selector"], "s", "{id}: {dkim}");
        assert_eq!(out.json["dmarc"]["result"], "fail", "{id}: {}", out.raw);
    }
}

/// `[auth] max_dns_lookups`: the lookups of one message are counted (in the JSON), and
/// past the limit the check that wanted one more is permerror without asking DNS.
/// `[auth] arc_max_sets`: more ARC sets than that is arc=permerror, also counted.
#[test]
fn work_per_message_is_counted_and_capped() {
    let f = fixture();
    // Three signatures with three keys: mail-from SPF (1), HELO SPF (1), three keys,
    // DMARC (at least 1).
    let control = std::fs::read(&f.files["control-rsa"]).expect("read");
    let ed = std::fs::read(&f.files["control-ed25519"]).expect("read");
    let sha256 = std::fs::read(&f.files["key-h-sha256"]).expect("read");
    let sig_of = |m: &[u8]| {
        let text = String::from_utf8_lossy(m).into_owned();
        let end = text.find("\r\nFrom: ").expect("From") + 2;
        text[..end].to_string()
    };
    let three = format!(
        "{}{}{}",
        sig_of(&ed),
        sig_of(&sha256),
        String::from_utf8_lossy(&control)
    );
    let path = f.dir.join("three-signatures.eml");
    std::fs::write(&path, &three).expect("write");
    let arc = format!(
        "ARC-Seal: i=3; a=rsa-sha256; cv=pass; d=x.example; s=s; b=AAAA\r\n\
ARC-Seal: i=2; a=rsa-sha256; cv=pass; d=x.example; s=s; b=AAAA\r\n\
ARC-Seal: i=1; a=rsa-sha256; cv=none; d=x.example; s=s; b=AAAA\r\n{three}"
    );
    let arc_path = f.dir.join("arc-three-sets.eml");
    std::fs::write(&arc_path, &arc).expect("write");
    let from = format!("alice@{DOMAIN}");

    let out = run_check(&f.config, &path, &from);
    let results: Vec<&str> = (0..3)
        .map(|i| out.json["dkim"][i]["result"].as_str().unwrap_or(""))
        .collect();
    assert_eq!(results, ["pass"; 3], "{}", out.raw);
    assert_eq!(out.json["dmarc"]["result"], "pass", "{}", out.raw);
    let used = out.json["work"]["dns_lookups"]
        .as_u64()
        .expect("work.dns_lookups");
    assert!((6..=64).contains(&used), "{used} lookups: {}", out.raw);
    assert_eq!(out.json["work"]["dns_lookups_refused"], 0, "{}", out.raw);

    // A limit of 3: both SPF lookups and the first key; the other two keys and DMARC
    // are refused. The queries the server saw show that nothing was asked past it.
    let capped = write_config(
        &f.dir,
        "capped",
        &f.dns,
        "max_dns_lookups = 3\narc_max_sets = 2",
    );
    let before = f
        .dns
        .queries_for(&format!("sha256only._domainkey.{DOMAIN}"));
    let out = run_check(&capped, &path, &from);
    let dkim = &out.json["dkim"];
    assert_eq!(dkim[0]["result"], "pass", "{}", out.raw);
    for i in [1, 2] {
        assert_eq!(dkim[i]["result"], "permerror", "{}", out.raw);
        assert_eq!(
            dkim[i]["reason"], "DNS lookup limit per message reached",
            "{}",
            out.raw
        );
        assert_eq!(dkim[i]["domain"], DOMAIN);
    }
    assert_eq!(out.json["dmarc"]["result"], "permerror", "{}", out.raw);
    assert_eq!(out.json["work"]["dns_lookups"], 3, "{}", out.raw);
    assert!(
        out.json["work"]["dns_lookups_refused"]
            .as_u64()
            .unwrap_or(0)
            >= 3,
        "{}",
        out.raw
    );
    assert_eq!(
        f.dns
            .queries_for(&format!("sha256only._domainkey.{DOMAIN}")),
        before,
        "a refused key was looked up anyway"
    );

    // ARC: three sets against a cap of two: permerror; under the default cap the
    // (garbage) chain is verified and fails.
    let out = run_check(&capped, &arc_path, &from);
    assert_eq!(out.json["arc"]["result"], "permerror", "{}", out.raw);
    assert_eq!(out.json["work"]["arc_sets"], 3, "{}", out.raw);
    let out = run_check(&f.config, &arc_path, &from);
    assert_ne!(out.json["arc"]["result"], "permerror", "{}", out.raw);
    assert_ne!(out.json["arc"]["result"], "pass", "{}", out.raw);
    assert_eq!(out.json["work"]["arc_sets"], 3, "{}", out.raw);
}

// ---------------------------------------------------------------------------
// Through the real proxy
// ---------------------------------------------------------------------------

/// What one message through the proxy gave.
struct Delivery {
    reply: common::smtp_client::Reply,
    /// What the next hop received.
    relayed: Vec<Vec<u8>>,
    /// The proxy's log (the verdict line is written before the reply is sent).
    log: String,
}

/// Sends case `id`'s message from `alice@<from_domain>` through a proxy for
/// example.org.
async fn deliver(id: &str, from_domain: &str) -> Delivery {
    let f = fixture();
    let mta = FakeMta::start(Script::default()).await;
    let mut o = ProxyOptions::smtp(mta.addr);
    o.auth = true;
    o.role = "inbound".into();
    o.local_domains = vec!["example.org".into()];
    o.dns_nameserver = Some(f.dns.nameserver());
    let proxy = Proxy::start(o).await;
    let msg = std::fs::read(&f.files[id]).expect("signed file");
    let mut c = proxy.connect_ehlo("mail.client.example").await;
    let r = c.cmd(&format!("MAIL FROM:<alice@{from_domain}>")).await;
    assert_reply(&r, "250 2.1.0", "MAIL FROM");
    let r = c.cmd("RCPT TO:<user@example.org>").await;
    assert_reply(&r, "250 2.1.5", "RCPT TO");
    let reply = c.data(&msg).await;
    let q = c.cmd("QUIT").await;
    assert_reply(&q, "221 2.0.0", "QUIT");
    let relayed = mta.messages().into_iter().map(|m| m.data).collect();
    Delivery {
        reply,
        relayed,
        log: proxy.log(),
    }
}

/// The A-R our proxy put on top of a relayed message.
fn our_ar(data: &[u8]) -> String {
    let text = String::from_utf8_lossy(data);
    let end = text.find("\r\n\r\n").unwrap_or(text.len());
    let mut ar = String::new();
    for line in text[..end].split("\r\n") {
        if line.starts_with("Authentication-Results:") {
            ar = line.to_string();
        } else if !ar.is_empty() && line.starts_with([' ', '\t']) {
            ar.push_str(line.trim_start());
        } else if !ar.is_empty() {
            break;
        }
    }
    ar
}

/// The control: a good signature of the p=reject domain is delivered with dkim=pass,
/// and the verdict log line counts the message's DNS lookups and ARC sets.
#[tokio::test]
async fn proxy_delivers_a_good_signature() {
    let d = deliver("control-rsa", DOMAIN).await;
    assert_reply(&d.reply, "250", "a validly signed message");
    assert_eq!(d.relayed.len(), 1);
    let ar = our_ar(&d.relayed[0]);
    assert!(
        ar.contains("dkim=pass") && ar.contains("dmarc=pass"),
        "{ar}"
    );
    let verdict = d
        .log
        .lines()
        .find(|l| l.contains("verdict") && l.contains("dns_lookups="))
        .unwrap_or_else(|| panic!("no verdict line with the counts:\n{}", d.log));
    let lookups: u32 = verdict
        .split("dns_lookups=")
        .nth(1)
        .and_then(|rest| rest.split(|c: char| !c.is_ascii_digit()).next())
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("no count in {verdict}"));
    // SPF for MAIL FROM and HELO, the key and DMARC, at least.
    assert!((3..=64).contains(&lookups), "{verdict}");
    assert!(
        verdict.contains("dns_lookups_refused=0") && verdict.contains("arc_sets=0"),
        "{verdict}"
    );
}

/// A spoof of the p=reject domain carrying a real signature whose h= leaves From out:
/// rejected, nothing relayed.
#[tokio::test]
async fn proxy_rejects_a_signature_that_does_not_sign_from() {
    let d = deliver("from-not-signed", DOMAIN).await;
    assert_reply(&d.reply, "550 5.7.1", "signature without From in h=");
    assert!(d.relayed.is_empty(), "relayed: {:?}", d.relayed);
}

/// A key record that allows only sha1 does not verify an rsa-sha256 signature.
#[tokio::test]
async fn proxy_rejects_a_key_whose_h_excludes_the_hash() {
    let d = deliver("key-h-sha1-vs-rsa-sha256", DOMAIN).await;
    assert_reply(
        &d.reply,
        "550 5.7.1",
        "key h=sha1 with an rsa-sha256 signature",
    );
    assert!(d.relayed.is_empty());
}

/// `l=`: the whole body signed is delivered; content appended after the signed length
/// of a p=reject domain is rejected; of a p=none domain it is delivered with
/// `dkim=policy (body length limit: ...)` in the Authentication-Results.
#[tokio::test]
async fn proxy_and_body_length_limits() {
    let d = deliver("l-whole-body", DOMAIN).await;
    assert_reply(&d.reply, "250", "l= covering the whole body");
    let ar = our_ar(&d.relayed[0]);
    assert!(
        ar.contains("dkim=pass header.d=example.com header.s=s"),
        "{ar}"
    );
    assert!(ar.contains("dmarc=pass"), "{ar}");

    let d = deliver("l-appended", DOMAIN).await;
    assert_reply(
        &d.reply,
        "550 5.7.1",
        "content appended after l= (p=reject)",
    );
    assert!(d.relayed.is_empty());

    let d = deliver("l-appended-lax", LAX).await;
    assert_reply(&d.reply, "250", "content appended after l= (p=none)");
    let ar = our_ar(&d.relayed[0]);
    assert!(
        ar.contains("dkim=policy (body length limit: 51 unsigned octets appended) header.d=lax.example header.s=s"),
        "{ar}"
    );
    assert!(!ar.contains("dmarc=pass"), "{ar}");
}
