//! The first run that shows the product working on any machine (issue 17): the shipped
//! `config/mailwarden.toml` with `config/demo.zone` and `examples/*.eml` gives one pass,
//! one spoof rejected and one message held, through `mailwarden check` and through the
//! proxy, with no DNS server reachable at all (every name outside the demo zone goes to
//! a dead loopback port), which is how the answers are the same everywhere.
//!
//! `regenerate_signed_examples` (ignored) re-signs `examples/pass.eml` with the demo key.

mod common;

use std::path::{Path, PathBuf};
use std::process::Command;

use common::smtp_client::assert_reply;
use common::{bin, bounded, dead_udp_addr, free_addr, repo_path};

/// One demo message: file, envelope, and what must happen to it.
struct Case {
    file: &'static str,
    helo: &'static str,
    mail_from: &'static str,
    verdict: &'static str,
    /// The proxy's reply to the end of DATA.
    reply: &'static str,
}

const CASES: [Case; 3] = [
    Case {
        file: "examples/pass.eml",
        helo: "mail.bank.example",
        mail_from: "news@bank.example",
        verdict: "accept",
        reply: "250",
    },
    Case {
        file: "examples/spoof.eml",
        helo: "mx.phish.example",
        mail_from: "attacker@phish.example",
        verdict: "reject",
        reply: "550 5.7.1",
    },
    Case {
        file: "examples/held.eml",
        helo: "mx.phish.example",
        mail_from: "bounce@phish.example",
        verdict: "quarantine",
        reply: "250",
    },
];

/// The shipped configuration, with only what a test must change: a free port, state in
/// `dir`, the demo zone by absolute path, and a resolver that cannot answer anything.
fn shipped_config(dir: &Path) -> (PathBuf, std::net::SocketAddr) {
    let text = std::fs::read_to_string(repo_path("config/mailwarden.toml")).unwrap();
    let zone = repo_path("config/demo.zone");
    assert!(
        text.contains("zone_files = [\"demo.zone\"]"),
        "the shipped config must use the demo zone"
    );
    let addr = free_addr();
    let text = text
        .replace("127.0.0.1:2525", &addr.to_string())
        .replace("../var/", "var/")
        .replace(
            "zone_files = [\"demo.zone\"]",
            &format!("zone_files = [{:?}]", zone.display().to_string()),
        )
        .replace(
            "nameservers = []",
            &format!("nameservers = [\"{}\"]", dead_udp_addr()),
        );
    assert!(text.contains(&addr.to_string()), "listener not found");
    let path = dir.join("mailwarden.toml");
    std::fs::write(&path, text).unwrap();
    (path, addr)
}

fn check_json(config: &Path, case: &Case) -> serde_json::Value {
    let out = Command::new(bin())
        .args(["check", "--json", "-c"])
        .arg(config)
        .args(["--ip", "127.0.0.1", "--helo", case.helo, "--mail-from"])
        .arg(case.mail_from)
        .args(["--rcpt", "user@example.org"])
        .arg(repo_path(case.file))
        .output()
        .unwrap();
    assert!(out.status.success(), "check {}: {out:?}", case.file);
    serde_json::from_slice(&out.stdout).unwrap_or_else(|e| {
        panic!(
            "{}: {e}: {}",
            case.file,
            String::from_utf8_lossy(&out.stdout)
        )
    })
}

#[test]
fn check_gives_pass_reject_and_held_from_the_demo_zone() {
    let dir = tempfile::tempdir().unwrap();
    let (config, _) = shipped_config(dir.path());
    for case in &CASES {
        let v = check_json(&config, case);
        assert_eq!(v["verdict"], case.verdict, "{}: {v:#}", case.file);
        // Every result comes from the zone: none is a temporary error (the resolver
        // behind it cannot answer anything).
        let results = [
            &v["spf"]["mail_from"]["result"],
            &v["spf"]["helo"]["result"],
            &v["dmarc"]["result"],
        ];
        assert!(
            results.iter().all(|r| r.is_string() && *r != "temperror"),
            "{}: a lookup left the demo zone: {v:#}",
            case.file
        );
    }
    let pass = check_json(&config, &CASES[0]);
    assert_eq!(pass["spf"]["mail_from"]["result"], "pass", "{pass:#}");
    assert_eq!(pass["dmarc"]["result"], "pass", "{pass:#}");
    assert!(pass["dkim"].to_string().contains("\"pass\""), "{pass:#}");
    for spoofed in &CASES[1..] {
        let v = check_json(&config, spoofed);
        assert_eq!(v["dmarc"]["result"], "fail", "{v:#}");
    }
}

#[test]
fn a_tampered_demo_message_no_longer_passes() {
    // The pass is the signature's: change one word of the signed body and it fails.
    let dir = tempfile::tempdir().unwrap();
    let (config, _) = shipped_config(dir.path());
    let text = std::fs::read_to_string(repo_path("examples/pass.eml")).unwrap();
    let tampered = dir.path().join("tampered.eml");
    std::fs::write(&tampered, text.replace("statement", "STATEMENT")).unwrap();
    let out = Command::new(bin())
        .args(["check", "--json", "-c"])
        .arg(&config)
        .args(["--ip", "198.51.100.7", "--helo", "mail.bank.example"])
        .args([
            "--mail-from",
            "news@bank.example",
            "--rcpt",
            "user@example.org",
        ])
        .arg(&tampered)
        .output()
        .unwrap();
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(v["dmarc"]["result"], "fail", "{v:#}");
    assert_eq!(v["verdict"], "reject", "{v:#}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_proxy_gives_pass_reject_and_held_from_the_demo_zone() {
    bounded(async {
        let dir = tempfile::tempdir().unwrap();
        let (config, addr) = shipped_config(dir.path());
        let log = std::fs::File::create(dir.path().join("stderr.log")).unwrap();
        let child = Killed(
            Command::new(bin())
                .args(["run", "-c"])
                .arg(&config)
                .stderr(log)
                .spawn()
                .unwrap(),
        );
        {
            let mut c = connect_when_ready(addr).await;
            for case in &CASES {
                c.cmd("RSET").await;
                assert_reply(&c.cmd(&format!("EHLO {}", case.helo)).await, "250", "EHLO");
                let body = std::fs::read(repo_path(case.file)).unwrap();
                let body = String::from_utf8(body).unwrap().replace('\n', "\r\n");
                assert_reply(
                    &c.cmd(&format!("MAIL FROM:<{}>", case.mail_from)).await,
                    "250",
                    "MAIL",
                );
                assert_reply(&c.cmd("RCPT TO:<user@example.org>").await, "250", "RCPT");
                let r = c.data(body.as_bytes()).await;
                assert_reply(&r, case.reply, case.file);
            }
        }
        drop(child);
        // One message delivered (the pass), one held; the spoof is nowhere.
        let delivered = std::fs::read_dir(dir.path().join("var/maildir/new"))
            .unwrap()
            .map(|e| std::fs::read_to_string(e.unwrap().path()).unwrap())
            .collect::<Vec<_>>();
        assert_eq!(delivered.len(), 1, "{delivered:?}");
        assert!(delivered[0].contains("Message-ID: <demo-pass@bank.example>"));
        assert!(delivered[0].contains("dmarc=pass"), "{}", delivered[0]);
        let held = Command::new(bin())
            .args(["quarantine", "-c"])
            .arg(&config)
            .arg("list")
            .output()
            .unwrap();
        let listing = String::from_utf8_lossy(&held.stdout);
        assert!(held.status.success(), "{held:?}");
        // Only the shop's message is held (the listing cuts long addresses short).
        assert!(
            listing.contains("\"Shop Example\" <orders@shop"),
            "{listing}"
        );
        assert!(listing.contains("\n1 entry"), "{listing}");
    })
    .await;
}

/// The proxy process, killed when the test ends, whatever happened.
struct Killed(std::process::Child);

impl Drop for Killed {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

async fn connect_when_ready(addr: std::net::SocketAddr) -> common::smtp_client::Client {
    for _ in 0..600 {
        if let Ok(mut c) = common::smtp_client::Client::try_connect(addr).await {
            let g = c.read_reply().await;
            assert_eq!(g.code, 220, "{g:?}");
            return c;
        }
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    }
    panic!("the proxy did not listen on {addr}");
}

/// The demo message that passes, before signing.
const PASS_UNSIGNED: &str = "From: Bank Example News <news@bank.example>\r\n\
To: <user@example.org>\r\n\
Subject: Your monthly statement is ready\r\n\
Date: Thu, 03 Dec 2026 09:00:00 +0000\r\n\
Message-ID: <demo-pass@bank.example>\r\n\
MIME-Version: 1.0\r\n\
Content-Type: text/plain; charset=us-ascii\r\n\
\r\n\
(demo) This message is signed with bank.example's demo DKIM key (examples/demo-dkim.key,\r\n\
DEMO ONLY) and sent from an address bank.example's SPF record lists: SPF, DKIM and\r\n\
DMARC pass, and mailwarden relays it with an Authentication-Results header.\r\n";

/// Writes `examples/pass.eml`: [`PASS_UNSIGNED`] signed with the demo key (selector
/// `demo`, d=bank.example, rsa-sha256, relaxed/relaxed).
#[test]
#[ignore = "regenerates examples/pass.eml"]
fn regenerate_signed_examples() {
    use mail_auth::common::crypto::{RsaKey, Sha256};
    use mail_auth::common::headers::HeaderWriter;
    use mail_auth::dkim::DkimSigner;
    use rustls::pki_types::PrivateKeyDer;
    use rustls::pki_types::pem::PemObject;
    let key = std::fs::read_to_string(repo_path("examples/demo-dkim.key")).unwrap();
    let pem = &key[key.find("-----BEGIN").expect("a PEM key")..];
    let der = PrivateKeyDer::from_pem_slice(pem.as_bytes()).unwrap();
    let key = RsaKey::<Sha256>::from_key_der(der).unwrap();
    let signature = DkimSigner::from_key(key)
        .domain("bank.example")
        .selector("demo")
        .headers([
            "From",
            "To",
            "Subject",
            "Date",
            "Message-ID",
            "MIME-Version",
            "Content-Type",
        ])
        .sign(PASS_UNSIGNED.as_bytes())
        .unwrap();
    let signed = format!("{}{PASS_UNSIGNED}", signature.to_header()).replace("\r\n", "\n");
    std::fs::write(repo_path("examples/pass.eml"), signed).unwrap();
}
