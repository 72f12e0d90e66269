//! Full reload of the running proxy (issue 17), through the real binary: SIGHUP and
//! `mailwarden reload`.
//!
//! * A certificate replaced on disk, a smaller size limit and another next hop, then a
//!   reload: new sessions get the new certificate, limit and next hop; a session that
//!   was in the middle of DATA finishes under the old ones, and its message arrives.
//! * A broken file (a syntax error, an unknown key, an unreadable certificate) changes
//!   nothing: the error names the file, line and key in the log and in `mailwarden
//!   reload`'s output and exit code.
//! * A listener added in the file is reported as needing a restart.

mod admin_common;
mod common;

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Arc;
use std::time::Duration;

use common::fake_mta::{FakeMta, Script};
use common::smtp_client::{assert_reply, simple_message};
use common::{Proxy, ProxyOptions, bin, bounded, cert_path, free_addr, key_path};
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, ServerName, UnixTime};
use rustls::{DigitallySignedStruct, SignatureScheme};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

const OLD_LIMIT: usize = 200_000;
const NEW_LIMIT: usize = 100_000;

/// Accepts any server certificate: the probe only wants to see which one is presented.
#[derive(Debug)]
struct AnyCert(Arc<rustls::crypto::CryptoProvider>);

impl ServerCertVerifier for AnyCert {
    fn verify_server_cert(
        &self,
        _: &CertificateDer<'_>,
        _: &[CertificateDer<'_>],
        _: &ServerName<'_>,
        _: &[u8],
        _: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        Ok(ServerCertVerified::assertion())
    }
    fn verify_tls12_signature(
        &self,
        m: &[u8],
        c: &CertificateDer<'_>,
        d: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(m, c, d, &self.0.signature_verification_algorithms)
    }
    fn verify_tls13_signature(
        &self,
        m: &[u8],
        c: &CertificateDer<'_>,
        d: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(m, c, d, &self.0.signature_verification_algorithms)
    }
    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.0.signature_verification_algorithms.supported_schemes()
    }
}

/// Reads until a final reply line (`NNN ` ) with code `code` arrives.
async fn expect_reply(tcp: &mut TcpStream, code: &str) {
    let mut buf = Vec::new();
    let mut chunk = [0u8; 4096];
    loop {
        let text = String::from_utf8_lossy(&buf).to_string();
        if let Some(last) = text.lines().rfind(|l| l.len() >= 4 && &l[3..4] == " ")
            && text.ends_with("\r\n")
        {
            assert!(last.starts_with(code), "expected {code}, got {text:?}");
            return;
        }
        let n = tokio::time::timeout(common::STEP, tcp.read(&mut chunk))
            .await
            .expect("reply timed out")
            .expect("read");
        assert!(n > 0, "connection closed; got {text:?}");
        buf.extend_from_slice(&chunk[..n]);
    }
}

/// The certificate a new session is offered after STARTTLS.
async fn presented_certificate(addr: std::net::SocketAddr) -> Vec<u8> {
    let mut tcp = TcpStream::connect(addr).await.expect("connect");
    expect_reply(&mut tcp, "220").await;
    tcp.write_all(b"EHLO probe.test\r\n").await.unwrap();
    expect_reply(&mut tcp, "250").await;
    tcp.write_all(b"STARTTLS\r\n").await.unwrap();
    expect_reply(&mut tcp, "220").await;
    let provider = Arc::new(rustls::crypto::aws_lc_rs::default_provider());
    let cfg = rustls::ClientConfig::builder_with_provider(provider.clone())
        .with_safe_default_protocol_versions()
        .unwrap()
        .dangerous()
        .with_custom_certificate_verifier(Arc::new(AnyCert(provider)))
        .with_no_client_auth();
    let tls = tokio_rustls::TlsConnector::from(Arc::new(cfg))
        .connect(ServerName::try_from("localhost").unwrap(), tcp)
        .await
        .expect("TLS handshake");
    tls.get_ref().1.peer_certificates().expect("a certificate")[0].to_vec()
}

fn cert_der(path: &Path) -> Vec<u8> {
    CertificateDer::from_pem_file(path)
        .unwrap_or_else(|e| panic!("{}: {e}", path.display()))
        .to_vec()
}

/// `mailwarden reload -c CONFIG`: (exit code, stdout, stderr).
fn reload_cli(config: &Path) -> (i32, String, String) {
    let out = Command::new(bin())
        .args(["reload", "-c"])
        .arg(config)
        .output()
        .expect("run mailwarden reload");
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into(),
        String::from_utf8_lossy(&out.stderr).into(),
    )
}

fn sighup(proxy: &Proxy) {
    let st = Command::new("kill")
        .arg("-HUP")
        .arg(proxy.pid().to_string())
        .status()
        .expect("kill -HUP");
    assert!(st.success());
}

/// A message of about `size` bytes with `marker` in its subject.
fn message_of(size: usize, marker: &str) -> Vec<u8> {
    let line = "x".repeat(76);
    let body: String = (0..size / 78).map(|_| format!("{line}\r\n")).collect();
    simple_message("alice@example.org", "bob@example.net", marker, &body)
}

/// The 1-based line of the first line of `text` that starts with `prefix`.
fn line_of(text: &str, prefix: &str) -> usize {
    text.lines()
        .position(|l| l.starts_with(prefix))
        .unwrap_or_else(|| panic!("no line starting {prefix:?} in\n{text}"))
        + 1
}

struct Setup {
    proxy: Proxy,
    first: FakeMta,
    second: FakeMta,
    certs: tempfile::TempDir,
    text: String,
}

impl Setup {
    fn cert(&self) -> PathBuf {
        self.certs.path().join("server.crt")
    }
    /// Rewrites the configuration file.
    fn write(&self, text: &str) {
        std::fs::write(&self.proxy.config_path, text).unwrap();
    }
}

async fn setup() -> Setup {
    let first = FakeMta::start(Script::default()).await;
    let second = FakeMta::start(Script::default()).await;
    let certs = tempfile::tempdir().unwrap();
    std::fs::copy(cert_path(), certs.path().join("server.crt")).unwrap();
    std::fs::copy(key_path(), certs.path().join("server.key")).unwrap();
    let mut opts = ProxyOptions::smtp(first.addr);
    opts.starttls = true;
    opts.limits
        .push(format!("message_size_limit = {OLD_LIMIT}"));
    opts.extra_toml
        .push("[process]\npid_file = \"mailwarden.pid\"".into());
    let (crt, key) = (
        certs.path().join("server.crt").display().to_string(),
        certs.path().join("server.key").display().to_string(),
    );
    let proxy = Proxy::start_edited(opts, |t| {
        t.replace(&cert_path().display().to_string(), &crt)
            .replace(&key_path().display().to_string(), &key)
    })
    .await;
    let text = proxy.config_text.clone();
    assert!(text.contains(&crt), "{text}");
    Setup {
        proxy,
        first,
        second,
        certs,
        text,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reload_applies_certificate_limit_and_next_hop_to_new_sessions_only() {
    bounded(async {
        let s = setup().await;
        let original = cert_der(&cert_path());
        assert_eq!(presented_certificate(s.proxy.addr).await, original);

        // A session in the middle of DATA, with a message the new limit refuses.
        let mut old = s.proxy.connect_ehlo("old.test").await;
        let big = message_of(150_000, "in-flight");
        assert!(big.len() > NEW_LIMIT && big.len() < OLD_LIMIT);
        assert_reply(
            &old.cmd("MAIL FROM:<alice@example.org>").await,
            "250",
            "MAIL",
        );
        assert_reply(&old.cmd("RCPT TO:<bob@example.net>").await, "250", "RCPT");
        assert_reply(&old.cmd("DATA").await, "354", "DATA");
        let (head, tail) = big.split_at(big.len() / 2);
        old.send_raw(head).await;

        // The certificate renewed on disk, a smaller limit, another next hop.
        let renewed = tempfile::tempdir().unwrap();
        let made = Command::new(bin())
            .args(["make-cert", "--name", "renewed.test", "--dir"])
            .arg(renewed.path())
            .output()
            .unwrap();
        assert!(made.status.success(), "{made:?}");
        std::fs::copy(renewed.path().join("server.crt"), s.cert()).unwrap();
        std::fs::copy(
            renewed.path().join("server.key"),
            s.certs.path().join("server.key"),
        )
        .unwrap();
        let new_cert = cert_der(&s.cert());
        assert_ne!(new_cert, original);
        let text = s
            .text
            .replace(
                &format!("message_size_limit = {OLD_LIMIT}"),
                &format!("message_size_limit = {NEW_LIMIT}"),
            )
            .replace(&s.first.url(), &s.second.url());
        assert_ne!(text, s.text);
        s.write(&text);
        let (code, out, err) = reload_cli(&s.proxy.config_path);
        assert_eq!(code, 0, "reload: {out}{err}\n{}", s.proxy.log());
        assert!(out.contains("reloaded"), "{out}");
        s.proxy
            .wait_log("configuration reloaded", Duration::from_secs(20))
            .await;

        // New sessions: the new certificate, the new limit (advertised and enforced),
        // the new next hop.
        assert_eq!(presented_certificate(s.proxy.addr).await, new_cert);
        let mut new = s.proxy.connect_ehlo("new.test").await;
        let ehlo = new.cmd("EHLO new.test").await;
        assert_eq!(
            ehlo.ext_line("SIZE"),
            Some(format!("SIZE {NEW_LIMIT}").as_str()),
            "{ehlo:?}"
        );
        let refused = new
            .send_mail(
                "alice@example.org",
                &["bob@example.net"],
                &message_of(150_000, "too-big-now"),
            )
            .await;
        assert_reply(&refused, "552", "over the reloaded size limit");
        let small = new
            .send_mail(
                "alice@example.org",
                &["bob@example.net"],
                &message_of(1_000, "after-reload"),
            )
            .await;
        assert_reply(&small, "250", "a new session after the reload");

        // The session that was in DATA finishes under its old settings: accepted,
        // relayed to the old next hop, nothing lost.
        let mut rest = tail.to_vec();
        rest.extend_from_slice(b".\r\n");
        old.send_raw(&rest).await;
        assert_reply(&old.read_reply().await, "250", "the in-flight message");

        let subjects = |m: &FakeMta| -> Vec<String> {
            m.accepted()
                .iter()
                .filter_map(|msg| {
                    msg.data_str()
                        .lines()
                        .find(|l| l.starts_with("Subject: "))
                        .map(|l| l["Subject: ".len()..].to_string())
                })
                .collect()
        };
        assert_eq!(subjects(&s.first), ["in-flight"]);
        assert_eq!(subjects(&s.second), ["after-reload"]);
        let delivered = s.first.accepted()[0].data.clone();
        assert!(
            common::contains(&delivered, &tail[..tail.len() - 2]),
            "the in-flight message arrived whole"
        );
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_broken_configuration_changes_nothing_and_says_where() {
    bounded(async {
        let s = setup().await;
        let original = cert_der(&cert_path());
        let path = s.proxy.config_path.display().to_string();

        // 1. An unknown key: `mailwarden reload` names file, line and key, and the
        // proxy (signalled directly) refuses it the same way.
        let broken = s
            .text
            .replace("[limits]\n", "[limits]\nmesage_size_limit = 5\n");
        let line = line_of(&broken, "mesage_size_limit");
        s.write(&broken);
        let (code, out, err) = reload_cli(&s.proxy.config_path);
        assert_eq!(code, 1, "{out}{err}");
        let place = format!("{path}:{line}: ");
        assert!(
            err.contains(&place) && err.contains("mesage_size_limit"),
            "want {place:?} and the key in: {err}"
        );
        sighup(&s.proxy);
        let log = s
            .proxy
            .wait_log("reload failed: keeping", Duration::from_secs(20))
            .await;
        let failed = log
            .lines()
            .find(|l| l.contains("reload failed: keeping"))
            .unwrap();
        assert!(failed.contains(&place), "{failed}");

        // 2. A certificate file that is not one, in a file that parses: the proxy
        // refuses it, and `mailwarden reload` reports the proxy's answer.
        std::fs::write(s.cert(), "not a certificate\n").unwrap();
        s.write(&s.text.replace(
            &format!("message_size_limit = {OLD_LIMIT}"),
            &format!("message_size_limit = {NEW_LIMIT}"),
        ));
        let (code, out, err) = reload_cli(&s.proxy.config_path);
        assert_eq!(code, 1, "{out}{err}");
        assert!(
            err.contains("reload failed, the running configuration stays")
                && err.contains(&s.cert().display().to_string()),
            "{err}"
        );

        // Nothing changed: the old certificate (held in memory), the old limit, the old
        // next hop.
        assert_eq!(presented_certificate(s.proxy.addr).await, original);
        let mut c = s.proxy.connect_ehlo("after.test").await;
        let ehlo = c.cmd("EHLO after.test").await;
        assert_eq!(
            ehlo.ext_line("SIZE"),
            Some(format!("SIZE {OLD_LIMIT}").as_str())
        );
        let r = c
            .send_mail(
                "alice@example.org",
                &["bob@example.net"],
                &message_of(150_000, "still-old"),
            )
            .await;
        assert_reply(&r, "250", "the old limit still applies");
        assert_eq!(s.first.accepted().len(), 1);
        assert!(s.second.accepted().is_empty());
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_new_listener_address_is_reported_as_needing_a_restart() {
    bounded(async {
        let s = setup().await;
        let extra = free_addr();
        let text = format!(
            "{}\n[[listener]]\naddress = \"{extra}\"\nrole = \"submission\"\n",
            s.text
        )
        // Another change that does apply.
        .replace(&s.first.url(), &s.second.url());
        s.write(&text);
        let (code, out, err) = reload_cli(&s.proxy.config_path);
        assert_eq!(code, 2, "{out}{err}");
        assert!(
            err.contains(&format!("listener {extra} is new")) && err.contains("restart"),
            "{err}"
        );
        assert!(
            TcpStream::connect(extra).await.is_err(),
            "nothing listens on {extra} before a restart"
        );
        let mut c = s.proxy.connect_ehlo("applied.test").await;
        let r = c
            .send_mail(
                "alice@example.org",
                &["bob@example.net"],
                &message_of(1_000, "to-second"),
            )
            .await;
        assert_reply(&r, "250", "the rest of the file applied");
        assert_eq!(s.second.accepted().len(), 1);
        assert!(s.first.accepted().is_empty());
    })
    .await;
}

/// `[outbound]` limits reloaded: the new limit applies at once, and the counts made under
/// the old detector carry over (a limit tightened in the middle of an incident must not
/// hand the attacker a fresh window).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn outbound_limits_reload_and_the_counts_carry_over() {
    bounded(async {
        let mta = FakeMta::start(Script::default()).await;
        let outbound = |limit: u32| {
            format!(
                "[outbound]\ntrusted_networks = [\"127.0.0.0/8\"]\naction = \"defer\"\n\
                 windows = [{{window = \"1h\", messages = {limit}}}]\n\
                 [outbound.adaptive]\nenabled = false\n\
                 [outbound.from]\nallow = \"any\"\n"
            )
        };
        let mut opts = ProxyOptions::smtp(mta.addr);
        opts.trusted_loopback = false;
        opts.extra_toml = vec![
            outbound(5),
            "[process]\npid_file = \"mailwarden.pid\"".into(),
        ];
        let proxy = Proxy::start(opts).await;
        let send = |n: usize| {
            let proxy = &proxy;
            async move {
                let mut c = proxy.connect_ehlo("app.test").await;
                c.send_mail(
                    "app@example.org",
                    &["someone@example.net"],
                    &message_of(500, &format!("m{n}")),
                )
                .await
            }
        };
        for n in 1..=3 {
            assert_reply(&send(n).await, "250", "under the first limit");
        }
        let text = proxy.config_text.replace("messages = 5}", "messages = 4}");
        assert_ne!(text, proxy.config_text);
        std::fs::write(&proxy.config_path, text).unwrap();
        let (code, out, err) = reload_cli(&proxy.config_path);
        assert_eq!(code, 0, "{out}{err}\n{}", proxy.log());
        assert_reply(&send(4).await, "250", "the 4th of at most 4");
        let fifth = send(5).await;
        assert_reply(
            &fifth,
            "451",
            "the 5th: over the reloaded limit, counts kept",
        );
        assert_eq!(mta.accepted().len(), 4);
    })
    .await;
}

/// The admin API follows reloads: after one that replaced the outbound detector, the
/// accounts it lists and freezes are those of the detector the sessions use (a freeze
/// on the replaced one would never apply).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_admin_api_acts_on_the_reloaded_detector() {
    bounded(async {
        let env = admin_common::start(admin_common::AdminOptions {
            submission: true,
            ..Default::default()
        })
        .await;
        let text = env.proxy.config_text.replace(
            "trusted_networks = [\"127.0.0.0/8\"]",
            "trusted_networks = [\"127.0.0.0/8\"]\nmax_recipient_domains = 50",
        );
        assert_ne!(text, env.proxy.config_text);
        std::fs::write(&env.proxy.config_path, text).unwrap();
        sighup(&env.proxy);
        env.proxy
            .wait_log("configuration reloaded", Duration::from_secs(20))
            .await;
        let sent = env
            .send(
                "carol@sender.example",
                &["bob@example.org"],
                &admin_common::message("carol@sender.example", "bob@example.org", "hi", "r-1"),
            )
            .await;
        assert!(sent.starts_with(b"250"), "{}", common::show(&sent));
        let list = env.get("/api/accounts").await.json();
        let carol = list["accounts"]
            .as_array()
            .unwrap()
            .iter()
            .find(|a| a["account"] == "carol@sender.example")
            .unwrap_or_else(|| panic!("the reloaded detector's account is not listed: {list}"));
        assert_eq!(carol["windows"][0]["messages"], 1, "{carol}");
        let f = env
            .post(
                "/api/accounts/carol%40sender.example/freeze",
                Some(br#"{"reason": "test"}"#),
            )
            .await;
        assert_eq!(f.status, 200, "{f:?}");
        // The freeze is on the detector the sessions use: the reloaded one.
        let list = env.get("/api/accounts").await.json();
        let frozen = list["accounts"]
            .as_array()
            .unwrap()
            .iter()
            .any(|a| a["account"] == "carol@sender.example" && a["frozen"] == true);
        assert!(frozen, "{list}");
    })
    .await;
}
