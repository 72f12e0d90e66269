//! Next-hop TLS through the real proxy (issue 13): `tls_verify` and `tls_ca_file`, and the
//! rule that AUTH credentials only go to a next hop on loopback or over verified TLS.
//!
//! A private CA is made here with rcgen; the fake next hop presents, after STARTTLS, a
//! certificate for the right name (127.0.0.1) signed by that CA, one for another name
//! signed by the same CA, or one for the right name signed by a CA nobody trusts. The
//! next hop is on loopback (the only place tests may reach), so `tls_verify = true` is
//! set explicitly; the "not loopback" half of the rule is unit-tested where it is decided
//! (`relay::may_send_credentials`, with non-loopback addresses).

mod common;

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use base64::Engine;
use common::fake_mta::{Act, FakeMta, Script};
use common::smtp_client::{Client, assert_reply};
use common::{Proxy, ProxyOptions};
use rustls::pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer};

const TEST_DEADLINE: Duration = Duration::from_secs(120);
const HELO: &str = "laptop.example.org";
const USER: &str = "alice@example.org";
const PASSWORD: &str = "pw-alice-Tls9";
const RELAYED: &str = "relayed-by-next-hop";

async fn within<F: std::future::Future<Output = ()>>(fut: F) {
    if tokio::time::timeout(TEST_DEADLINE, fut).await.is_err() {
        panic!("test did not finish within {TEST_DEADLINE:?}");
    }
}

/// A certificate authority made for one test.
struct Ca {
    issuer: rcgen::CertifiedIssuer<'static, rcgen::KeyPair>,
}

impl Ca {
    fn new(name: &str) -> Ca {
        let mut params = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
        params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
        params
            .distinguished_name
            .push(rcgen::DnType::CommonName, name);
        params.key_usages = vec![
            rcgen::KeyUsagePurpose::KeyCertSign,
            rcgen::KeyUsagePurpose::CrlSign,
        ];
        let key = rcgen::KeyPair::generate().unwrap();
        Ca {
            issuer: rcgen::CertifiedIssuer::self_signed(params, key).unwrap(),
        }
    }

    fn write_pem(&self, dir: &Path) -> PathBuf {
        let path = dir.join("private-ca.pem");
        std::fs::write(&path, self.issuer.pem()).unwrap();
        path
    }

    /// A server configuration presenting a certificate for `name` (a DNS name or an IP
    /// address) signed by this CA.
    fn server(&self, name: &str) -> Arc<rustls::ServerConfig> {
        let params = rcgen::CertificateParams::new(vec![name.to_string()]).unwrap();
        let key = rcgen::KeyPair::generate().unwrap();
        let cert = params.signed_by(&key, &self.issuer).unwrap();
        let chain = vec![
            CertificateDer::from(cert.der().to_vec()),
            CertificateDer::from(self.issuer.der().to_vec()),
        ];
        let key = PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(key.serialize_der()));
        let cfg = rustls::ServerConfig::builder_with_provider(Arc::new(
            rustls::crypto::aws_lc_rs::default_provider(),
        ))
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_no_client_auth()
        .with_single_cert(chain, key)
        .unwrap();
        Arc::new(cfg)
    }
}

/// A next hop on 127.0.0.1 offering STARTTLS (with `tls`) and AUTH PLAIN LOGIN.
async fn next_hop(tls: Arc<rustls::ServerConfig>) -> FakeMta {
    let script = Script {
        tls_server: Some(tls),
        eod: Act::reply(&format!("250 2.0.0 Ok: {RELAYED}")),
        ..Script::default()
    }
    .with_starttls()
    .with_auth();
    let mta = FakeMta::start(script).await;
    mta.set_auth_users(&[(USER, PASSWORD)]);
    mta
}

/// A submission proxy relaying to `mta` with opportunistic STARTTLS and the given
/// `[next_hop]` lines.
async fn proxy(mta: &FakeMta, next_hop: &[String]) -> Proxy {
    let mut o = ProxyOptions::smtp(mta.addr);
    o.starttls = true;
    o.next_hop_tls = "opportunistic".into();
    for l in next_hop {
        o = o.next_hop_opt(l);
    }
    Proxy::start(o).await
}

/// Connect, EHLO, STARTTLS, EHLO: ready for AUTH.
async fn tls_session(proxy: &Proxy) -> Client {
    let mut c = proxy.connect_ehlo(HELO).await;
    c.starttls().await;
    c.ehlo(HELO).await;
    c
}

fn plain() -> String {
    base64::engine::general_purpose::STANDARD.encode(format!("\0{USER}\0{PASSWORD}"))
}

/// The password never reached the next hop, in any form, on any connection.
fn assert_no_credentials_sent(mta: &FakeMta) {
    assert!(mta.auth_attempts().is_empty(), "{:?}", mta.auth_attempts());
    let bytes = mta.all_bytes();
    let all = String::from_utf8_lossy(&bytes);
    assert!(
        !all.contains(&plain()),
        "AUTH PLAIN blob reached the next hop"
    );
    assert!(
        !all.contains(&base64::engine::general_purpose::STANDARD.encode(PASSWORD)),
        "AUTH LOGIN password reached the next hop"
    );
    assert!(
        !mta.all_commands()
            .iter()
            .any(|c| c.to_ascii_uppercase().starts_with("AUTH")),
        "{:?}",
        mta.all_commands()
    );
}

/// `tls_verify = true` with `tls_ca_file` naming the private CA.
fn verify_with(ca_file: &Path) -> Vec<String> {
    vec![
        "tls_verify = true".to_string(),
        format!("tls_ca_file = {:?}", ca_file.display().to_string()),
    ]
}

#[tokio::test]
async fn auth_is_relayed_over_tls_verified_with_the_private_ca() {
    within(async {
        let dir = tempfile::tempdir().unwrap();
        let ca = Ca::new("mailwarden test private CA");
        let mta = next_hop(ca.server("127.0.0.1")).await;
        let proxy = proxy(&mta, &verify_with(&ca.write_pem(dir.path()))).await;

        let mut c = tls_session(&proxy).await;
        let r = c.cmd(&format!("AUTH PLAIN {}", plain())).await;
        assert_reply(&r, "235 2.7.0", "AUTH over TLS verified with tls_ca_file");
        let attempts = mta.auth_attempts();
        assert_eq!(attempts.len(), 1, "{attempts:?}");
        assert!(attempts[0].success, "{attempts:?}");
        assert!(
            mta.conns()[attempts[0].conn].tls,
            "the login crossed a TLS session"
        );
        let _ = c.cmd("QUIT").await;
    })
    .await;
}

#[tokio::test]
async fn a_certificate_for_another_name_gets_no_credentials_and_no_mail() {
    within(async {
        let dir = tempfile::tempdir().unwrap();
        let ca = Ca::new("mailwarden test private CA");
        // Signed by the trusted CA, but for a name that is not the next hop's.
        let mta = next_hop(ca.server("mx.attacker.example")).await;
        let proxy = proxy(&mta, &verify_with(&ca.write_pem(dir.path()))).await;

        let mut c = tls_session(&proxy).await;
        let r = c.cmd(&format!("AUTH PLAIN {}", plain())).await;
        assert_reply(
            &r,
            "454 4.7.0",
            "AUTH with a mismatching next-hop certificate",
        );
        assert!(
            r.text().contains("secure link"),
            "the refusal says why: {}",
            r.text()
        );
        assert_no_credentials_sent(&mta);
        let log = proxy
            .wait_log("AUTH refused: credentials are only relayed", TEST_DEADLINE)
            .await;
        assert!(
            log.lines()
                .any(|l| l.contains("ERROR") && l.contains("AUTH refused: credentials")),
            "{log}"
        );
        assert!(!log.contains(PASSWORD), "the password was logged");

        // Mail goes nowhere either: verification failed, so the client keeps it (4xx).
        let mut c = proxy.connect_ehlo(HELO).await;
        let r = c.cmd("MAIL FROM:<web@example.org>").await;
        assert_eq!(r.code, 250, "{r:?}");
        let r = c.cmd("RCPT TO:<bob@example.net>").await;
        assert_eq!(r.code / 100, 4, "a next hop failing verification: {r:?}");
        assert!(mta.messages().is_empty(), "{:?}", mta.messages().len());
    })
    .await;
}

#[tokio::test]
async fn a_certificate_from_an_untrusted_ca_is_refused() {
    within(async {
        let dir = tempfile::tempdir().unwrap();
        let trusted = Ca::new("mailwarden test private CA");
        // The right name, but signed by a CA that is not in tls_ca_file (an attacker's own).
        let rogue = Ca::new("mailwarden test private CA");
        let mta = next_hop(rogue.server("127.0.0.1")).await;
        let proxy = proxy(&mta, &verify_with(&trusted.write_pem(dir.path()))).await;

        let mut c = tls_session(&proxy).await;
        let r = c.cmd(&format!("AUTH PLAIN {}", plain())).await;
        assert_reply(&r, "454 4.7.0", "AUTH with a next hop signed by another CA");
        assert_no_credentials_sent(&mta);
    })
    .await;
}

#[tokio::test]
async fn tls_verify_false_stays_possible_on_loopback() {
    within(async {
        // Explicitly unverified, on loopback: the self-signed case of a local MTA. The
        // password never leaves the machine, so the login is relayed.
        let ca = Ca::new("mailwarden test private CA");
        let mta = next_hop(ca.server("mx.elsewhere.example")).await;
        let proxy = proxy(&mta, &["tls_verify = false".to_string()]).await;
        let mut c = tls_session(&proxy).await;
        let r = c.cmd(&format!("AUTH PLAIN {}", plain())).await;
        assert_reply(
            &r,
            "235 2.7.0",
            "AUTH to a loopback next hop, unverified TLS",
        );
        let _ = c.cmd("QUIT").await;
    })
    .await;
}
