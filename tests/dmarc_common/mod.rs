//! Shared by tests/dmarc_records.rs and tests/arc_sealers.rs: messages signed and ARC-sealed
//! by dkimpy (an independent implementation: Debian `python3-dkim`, which brings
//! `python3-authres` for ARC), `mailwarden check --json` against the loopback DNS server,
//! and one SMTP transaction through the real proxy.
#![allow(dead_code)]

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use serde_json::{Value, json};

use super::common::dns::{DnsServer, Zone};
use super::common::fake_mta::{FakeMta, Script};
use super::common::smtp_client::{Reply, assert_reply};
use super::common::{Proxy, ProxyOptions, bin, run_bounded};

/// Upper bound for one run of the binary or of the signer.
pub const DEADLINE: Duration = Duration::from_secs(120);
/// EHLO name of the test client (not in any zone: SPF for HELO is `none`).
pub const HELO: &str = "mx.client.example";
pub const RCPT: &str = "user@example.org";

/// A signing key: dkimpy signs with it, its public half is served from the loopback DNS.
pub struct Key {
    pub name: &'static str,
    pub domain: &'static str,
    pub selector: &'static str,
}

/// One step of building a message.
pub enum Step {
    /// Put these header lines (each ending in CRLF) at the top.
    Prepend(String),
    /// A DKIM signature with this key (relaxed/relaxed, rsa-sha256).
    Dkim(&'static str),
    /// An ARC set by this key's domain, recording the message's
    /// `Authentication-Results: <srv_id>; ...` field (dkimpy's arc_sign).
    Arc {
        key: &'static str,
        srv_id: &'static str,
    },
    /// Put the ARC header fields of an earlier job's message at the top.
    CopyArcFrom(&'static str),
    /// Replace the first occurrence of `from` (which must be there) by `to`.
    Replace(&'static str, &'static str),
}

pub struct Job {
    pub id: &'static str,
    pub message: String,
    pub steps: Vec<Step>,
}

const SIGNER_PY: &str = r#"
import sys, os, json, base64, subprocess, re
import dkim

out = sys.argv[1]
spec = json.load(open(os.path.join(out, 'jobs.json')))

def openssl(*args):
    return subprocess.run(['openssl', *args], check=True, capture_output=True).stdout

def rsa_key(name):
    pem = os.path.join(out, name + '.pem')
    try:
        openssl('genrsa', '-traditional', '-out', pem, '2048')
    except subprocess.CalledProcessError:
        openssl('genrsa', '-out', pem, '2048')
    der = openssl('rsa', '-in', pem, '-pubout', '-outform', 'DER')
    return open(pem, 'rb').read(), 'v=DKIM1; k=rsa; p=' + base64.b64encode(der).decode()

keys, dns = {}, {}
for k in spec['keys']:
    pem, rec = rsa_key(k['name'])
    keys[k['name']] = (k, pem)
    dns['%s._domainkey.%s' % (k['selector'], k['domain'])] = rec

def arc_fields(msg):
    head = msg.split(b'\r\n\r\n', 1)[0] + b'\r\n'
    fields = re.findall(rb'(?m)^[^ \t\r\n][^\r\n]*\r\n(?:[ \t][^\r\n]*\r\n)*', head)
    return b''.join(f for f in fields if f.lower().startswith(b'arc-'))

done = {}
for job in spec['jobs']:
    msg = job['message'].encode()
    for st in job['steps']:
        op = st['op']
        if op == 'prepend':
            msg = st['text'].encode() + msg
        elif op == 'dkim':
            k, pem = keys[st['key']]
            msg = dkim.sign(msg, k['selector'].encode(), k['domain'].encode(), pem,
                            canonicalize=(b'relaxed', b'relaxed'), linesep=b'\r\n') + msg
        elif op == 'arc':
            k, pem = keys[st['key']]
            fields = dkim.arc_sign(msg, k['selector'].encode(), k['domain'].encode(), pem,
                                   st['srv_id'].encode(), linesep=b'\r\n')
            assert fields, 'arc_sign produced no set for ' + job['id']
            msg = b''.join(fields) + msg
        elif op == 'copy_arc':
            msg = arc_fields(done[st['from']]) + msg
        elif op == 'replace':
            assert st['from'].encode() in msg, (job['id'], st['from'])
            msg = msg.replace(st['from'].encode(), st['to'].encode(), 1)
    done[job['id']] = msg
    open(os.path.join(out, job['id'] + '.eml'), 'wb').write(msg)

json.dump({'dns': dns}, open(os.path.join(out, 'manifest.json'), 'w'))
"#;

fn python() -> String {
    super::common::python_with(
        "dkim, authres",
        "these tests need python3 with dkimpy and authres (`apt-get install python3-dkim \
         python3-authres`) and the openssl command",
    )
}

/// What [`sign`] made: the key records to publish (name, TXT) and each job's message.
pub type Signed = (Vec<(String, String)>, BTreeMap<String, Vec<u8>>);

/// Signs every job in `dir`; returns the key records to publish and each job's message.
pub fn sign(dir: &Path, keys: &[Key], jobs: &[Job]) -> Signed {
    let step = |s: &Step| match s {
        Step::Prepend(text) => json!({"op": "prepend", "text": text}),
        Step::Dkim(key) => json!({"op": "dkim", "key": key}),
        Step::Arc { key, srv_id } => json!({"op": "arc", "key": key, "srv_id": srv_id}),
        Step::CopyArcFrom(id) => json!({"op": "copy_arc", "from": id}),
        Step::Replace(from, to) => json!({"op": "replace", "from": from, "to": to}),
    };
    let spec = json!({
        "keys": keys.iter().map(|k| json!({"name": k.name, "domain": k.domain, "selector": k.selector})).collect::<Vec<_>>(),
        "jobs": jobs.iter().map(|j| json!({"id": j.id, "message": j.message, "steps": j.steps.iter().map(step).collect::<Vec<_>>()})).collect::<Vec<_>>(),
    });
    std::fs::write(dir.join("jobs.json"), spec.to_string()).expect("write jobs");
    std::fs::write(dir.join("sign.py"), SIGNER_PY).expect("write signer");
    let out = Command::new(python())
        .arg(dir.join("sign.py"))
        .arg(dir)
        .output()
        .expect("run the dkimpy signer");
    assert!(
        out.status.success(),
        "dkimpy signer failed:\n{}\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    let manifest: Value =
        serde_json::from_slice(&std::fs::read(dir.join("manifest.json")).expect("manifest"))
            .expect("manifest JSON");
    let dns = manifest["dns"]
        .as_object()
        .expect("dns map")
        .iter()
        .map(|(k, v)| (k.clone(), v.as_str().expect("TXT").to_string()))
        .collect();
    let messages = jobs
        .iter()
        .map(|j| {
            let path = dir.join(format!("{}.eml", j.id));
            (
                j.id.to_string(),
                std::fs::read(&path).expect("signed message"),
            )
        })
        .collect();
    (dns, messages)
}

/// A plain message (CRLF) from `from`, with `subject` and `body`.
pub fn message(from: &str, subject: &str, body: &str) -> String {
    format!(
        "From: {from}\r\nTo: <{RCPT}>\r\nSubject: {subject}\r\nDate: Thu, 03 Dec 2026 10:00:00 +0000\r\nMessage-ID: <{subject}@client.example>\r\nMIME-Version: 1.0\r\nContent-Type: text/plain; charset=us-ascii\r\n\r\n{body}"
    )
}

/// A `check` config in `dir`: the loopback DNS with a short timeout, and `auth` lines.
pub fn check_config(dir: &Path, dns: &DnsServer, auth: &[&str]) -> PathBuf {
    let path = dir.join("check.toml");
    std::fs::write(
        &path,
        format!(
            "[dns]\nnameservers = [\"{}\"]\ntimeout_ms = 300\nattempts = 1\n\n[auth]\n{}\n",
            dns.nameserver(),
            auth.join("\n")
        ),
    )
    .expect("write config");
    path
}

/// `mailwarden check --json` for a message from 127.0.0.1.
pub async fn check_json(
    config: &Path,
    dir: &Path,
    mail_from: &str,
    msg: &[u8],
    name: &str,
) -> Value {
    let msg_path = dir.join(format!("{name}.check.eml"));
    std::fs::write(&msg_path, msg).expect("write message");
    let mut cmd = Command::new(bin());
    cmd.arg("check")
        .arg("--config")
        .arg(config)
        .args([
            "--ip",
            "127.0.0.1",
            "--helo",
            HELO,
            "--mail-from",
            mail_from,
            "--rcpt",
            RCPT,
            "--json",
        ])
        .arg(&msg_path);
    let run = run_bounded(cmd, dir, DEADLINE).await;
    assert!(
        run.success(),
        "check failed ({:?}): {}",
        run.status,
        run.stderr
    );
    let out = run.stdout_text();
    serde_json::from_str(out.trim()).unwrap_or_else(|e| panic!("no JSON ({e}): {out:?}"))
}

/// The DMARC part of the `Authentication-Results` in a `check --json` object.
pub fn ar_dmarc(v: &Value) -> String {
    let ar = v["authentication_results"].as_str().unwrap_or_default();
    ar.split(';')
        .map(str::trim)
        .find(|p| p.starts_with("dmarc="))
        .unwrap_or_default()
        .split_whitespace()
        .collect::<Vec<_>>()
        .join(" ")
}

/// DNS, fake next hop and the proxy (inbound for example.org, auth on, `auth` lines added
/// to `[auth]`, DNS timeout 300 ms with one attempt).
pub struct Env {
    pub dns: DnsServer,
    pub mta: FakeMta,
    pub proxy: Proxy,
}

pub async fn start_proxy(zone: Zone, auth: &[&str]) -> Env {
    let dns = DnsServer::start(zone);
    let mta = FakeMta::start(Script::default()).await;
    let mut o = ProxyOptions::smtp(mta.addr);
    o.auth = true;
    o.role = "inbound".into();
    o.local_domains = vec!["example.org".into()];
    o.dns_nameserver = Some(dns.nameserver());
    o.xclient = "require".into();
    o.auth_extra = auth.iter().map(|s| s.to_string()).collect();
    let proxy = Proxy::start_edited(o, |c| {
        c.replacen("[dns]\n", "[dns]\ntimeout_ms = 300\nattempts = 1\n", 1)
    })
    .await;
    Env { dns, mta, proxy }
}

/// One session: EHLO, MAIL, RCPT, DATA; the end-of-data reply.
pub async fn deliver(proxy: &Proxy, mail_from: &str, msg: &[u8]) -> Reply {
    let mut c = proxy.connect_ehlo(HELO).await;
    let r = c.cmd(&format!("MAIL FROM:<{mail_from}>")).await;
    assert_reply(&r, "250", "MAIL FROM");
    let r = c.cmd(&format!("RCPT TO:<{RCPT}>")).await;
    assert_reply(&r, "250", "RCPT TO");
    let reply = c.data(msg).await;
    let _ = c.cmd("QUIT").await;
    reply
}
