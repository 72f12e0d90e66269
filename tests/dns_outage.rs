//! DNS outages through the real proxy (issue 20): serve-stale and nameserver failover.
//!
//! `mailwarden run` verifies mail from 127.0.0.1 against the loopback DNS server of
//! tests/common/dns.rs, with a TTL of 1 s on every record, so that the proxy's caches are
//! empty of fresh answers a moment after the warm-up and every check during the outage
//! rests on serve-stale. Each known domain publishes `v=spf1 ip4:192.0.2.1 -all` (SPF
//! fails from 127.0.0.1), an Ed25519 DKIM key at `s1._domainkey` and `p=reject`: legitimate
//! mail aligns through its DKIM signature alone, and a spoof (signed with another key
//! under the same selector) fails DMARC.

mod common;

use std::time::Duration;

use base64::Engine;
use common::dns::{DnsServer, Zone};
use common::fake_mta::{FakeMta, Script};
use common::smtp_client::Reply;
use common::{Proxy, ProxyOptions, bounded, show};
use mail_auth::common::crypto::Ed25519Key;
use mail_auth::common::headers::HeaderWriter;
use mail_auth::dkim::DkimSigner;

const RCPT: &str = "user@example.org";
const HELO: &str = "mx.client.example";
const KNOWN: usize = 20;
const NEVER_SEEN: usize = 5;

struct Key {
    pkcs8: Vec<u8>,
    public: String,
}

impl Key {
    fn new() -> Key {
        let pkcs8 = Ed25519Key::generate_pkcs8().unwrap();
        let public = base64::engine::general_purpose::STANDARD
            .encode(Ed25519Key::from_pkcs8_der(&pkcs8).unwrap().public_key());
        Key { pkcs8, public }
    }

    fn record(&self) -> String {
        format!("v=DKIM1; k=ed25519; p={}", self.public)
    }

    /// A message From `domain`, signed by this key as `d=domain; s=s1`.
    fn message(&self, domain: &str, subject: &str) -> Vec<u8> {
        let body = format!(
            "From: <news@{domain}>\r\nTo: <{RCPT}>\r\nSubject: {subject}\r\nMessage-ID: <{subject}@{domain}>\r\nDate: Thu, 03 Dec 2026 10:00:00 +0000\r\n\r\nHello.\r\n"
        );
        let sig = DkimSigner::from_key(Ed25519Key::from_pkcs8_der(&self.pkcs8).unwrap())
            .domain(domain)
            .selector("s1")
            .headers(["From", "To", "Subject", "Message-ID", "Date"])
            .sign(body.as_bytes())
            .unwrap();
        format!("{}{body}", sig.to_header()).into_bytes()
    }
}

fn known(i: usize) -> String {
    format!("k{i:02}.example")
}

fn never_seen(i: usize) -> String {
    format!("new{i}.example")
}

fn add_domain(z: Zone, domain: &str, key: &Key) -> Zone {
    z.txt(domain, "v=spf1 ip4:192.0.2.1 -all")
        .txt(&format!("s1._domainkey.{domain}"), &key.record())
        .txt(&format!("_dmarc.{domain}"), "v=DMARC1; p=reject")
}

/// One session, one transaction; the end-of-data reply.
async fn send(proxy: &Proxy, domain: &str, msg: &[u8]) -> Reply {
    let mut c = proxy.connect_ehlo(HELO).await;
    let r = c.cmd(&format!("MAIL FROM:<news@{domain}>")).await;
    assert_eq!(r.code, 250, "MAIL: {r:?}");
    let r = c.cmd(&format!("RCPT TO:<{RCPT}>")).await;
    assert_eq!(r.code, 250, "RCPT: {r:?}");
    let reply = c.data(msg).await;
    let _ = c.cmd("QUIT").await;
    reply
}

/// Our Authentication-Results of the last message the next hop received.
fn last_ar(mta: &FakeMta) -> String {
    let msgs = mta.messages();
    let data = show(&msgs.last().expect("a relayed message").data);
    let mut lines = data.split("\r\n");
    let mut out = String::new();
    while let Some(line) = lines.next() {
        if line.starts_with("Authentication-Results: mailwarden.test") {
            out.push_str(line);
            for cont in lines.by_ref() {
                if !cont.starts_with([' ', '\t']) {
                    break;
                }
                out.push_str(cont);
            }
            return out;
        }
    }
    panic!("no Authentication-Results of ours in {data}");
}

/// The proxy with `[dns]` replaced by `dns_toml`.
async fn proxy_with_dns(mta: &FakeMta, dns_toml: String) -> Proxy {
    let mut o = ProxyOptions::smtp(mta.addr);
    o.auth = true;
    o.role = "inbound".into();
    o.local_domains = vec!["example.org".into()];
    o.dns_nameserver = Some("127.0.0.1:9".into());
    Proxy::start_edited(o, move |cfg| {
        cfg.replace(
            "[dns]\nnameservers = [\"127.0.0.1:9\"]\n",
            &format!("[dns]\n{dns_toml}\n"),
        )
    })
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn known_senders_keep_flowing_through_an_outage_spoofs_do_not() {
    bounded(async {
        let keys: Vec<Key> = (0..KNOWN).map(|_| Key::new()).collect();
        let new_keys: Vec<Key> = (0..NEVER_SEEN).map(|_| Key::new()).collect();
        let attacker = Key::new();
        let zone = |first: &Key| {
            let mut zone = Zone::new();
            for (i, k) in keys.iter().enumerate() {
                zone = add_domain(zone, &known(i), if i == 0 { first } else { k });
            }
            for (i, k) in new_keys.iter().enumerate() {
                zone = add_domain(zone, &never_seen(i), k);
            }
            zone
        };
        let mut dns = DnsServer::start(zone(&keys[0]));
        dns.set_ttl(1);
        let mta = FakeMta::start(Script::default()).await;
        let proxy = proxy_with_dns(
            &mta,
            format!(
                "nameservers = [\"{}\"]\ntimeout_ms = 500\nattempts = 1\n",
                dns.addr()
            ),
        )
        .await;

        // Warm-up: every known domain writes once, and is spoofed once (rejected).
        for (i, k) in keys.iter().enumerate() {
            let r = send(
                &proxy,
                &known(i),
                &k.message(&known(i), &format!("warm{i}")),
            )
            .await;
            assert_eq!(r.code, 250, "warm-up {i}: {r:?}");
            assert!(!last_ar(&mta).contains("stale"), "fresh before the outage");
            let r = send(
                &proxy,
                &known(i),
                &attacker.message(&known(i), &format!("spoof{i}")),
            )
            .await;
            assert_eq!(r.code, 550, "spoof before the outage {i}: {r:?}");
        }
        // Every fresh answer expires (TTL 1 s), then the server goes away.
        tokio::time::sleep(Duration::from_millis(1500)).await;
        dns.stop();
        // A key is rotated while no server answers (the sender signs with the new one).
        let rotated = Key::new();
        dns.set_zone(zone(&rotated));

        let relayed_before = mta.messages().len();
        for (i, k) in keys.iter().enumerate() {
            let r = send(&proxy, &known(i), &k.message(&known(i), &format!("out{i}"))).await;
            assert_eq!(r.code, 250, "known sender {i} during the outage: {r:?}");
            let ar = last_ar(&mta);
            assert!(ar.contains("dkim=pass (stale key, "), "{ar}");
            assert!(ar.contains("dmarc=pass (stale record, "), "{ar}");
        }
        assert_eq!(
            mta.messages().len(),
            relayed_before + KNOWN,
            "100 % delivered"
        );
        for i in 0..KNOWN {
            let r = send(
                &proxy,
                &known(i),
                &attacker.message(&known(i), &format!("ospoof{i}")),
            )
            .await;
            assert_eq!(
                r.code, 451,
                "a spoof of a p=reject domain during the outage: {r:?}"
            );
            assert!(r.text().contains("stale DNS"), "{r:?}");
        }
        for (i, k) in new_keys.iter().enumerate() {
            let r = send(
                &proxy,
                &never_seen(i),
                &k.message(&never_seen(i), &format!("new{i}")),
            )
            .await;
            assert_eq!(r.code, 451, "never-seen domain {i}: {r:?}");
        }
        // Signed with the rotated key: the stale (old) key fails it; deferred, not rejected.
        let r = send(&proxy, &known(0), &rotated.message(&known(0), "rot-out")).await;
        assert_eq!(r.code, 451, "rotated key during the outage: {r:?}");
        assert_eq!(
            mta.messages().len(),
            relayed_before + KNOWN,
            "no spoof, never-seen or unverifiable message relayed"
        );

        // The server answers again: fresh answers within 5 s (20 tries 250 ms apart),
        // and the rotated key is used at once.
        dns.restart();
        let mut fresh = None;
        for attempt in 0..20 {
            let r = send(
                &proxy,
                &known(0),
                &rotated.message(&known(0), &format!("back{attempt}")),
            )
            .await;
            if r.code == 250 && !last_ar(&mta).contains("stale") {
                fresh = Some(attempt);
                break;
            }
            tokio::time::sleep(Duration::from_millis(250)).await;
        }
        assert!(fresh.is_some(), "no fresh answer within 5 s of the restart");
        // The deferred spoof, retried, is now rejected; the never-seen domains pass.
        let r = send(&proxy, &known(3), &attacker.message(&known(3), "retry")).await;
        assert_eq!(r.code, 550, "{r:?}");
        let r = send(
            &proxy,
            &never_seen(0),
            &new_keys[0].message(&never_seen(0), "retry"),
        )
        .await;
        assert_eq!(r.code, 250, "{r:?}");
        assert!(!last_ar(&mta).contains("stale"));
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dead_nameserver_is_skipped_after_the_first_messages() {
    bounded(async {
        // Every message from a domain of its own: each needs new lookups (SPF, DKIM
        // key, DMARC record), none answered from a cache.
        const MESSAGES: usize = 30;
        let keys: Vec<Key> = (0..MESSAGES).map(|_| Key::new()).collect();
        let mut zone = Zone::new();
        for (i, k) in keys.iter().enumerate() {
            zone = add_domain(zone, &known(i), k);
        }
        // The first nameserver never answers (and logs what it is asked).
        let dead = DnsServer::start(Zone::new());
        dead.set_blackhole(true);
        let live = DnsServer::start(zone);
        let mta = FakeMta::start(Script::default()).await;
        let proxy = proxy_with_dns(
            &mta,
            format!(
                "nameservers = [\"{}\", \"{}\"]\ntimeout_ms = 1000\nattempts = 1\n",
                dead.addr(),
                live.addr()
            ),
        )
        .await;
        for (i, k) in keys.iter().enumerate() {
            let r = send(&proxy, &known(i), &k.message(&known(i), &format!("m{i}"))).await;
            assert_eq!(r.code, 250, "message {i}: {r:?}");
            assert!(
                !last_ar(&mta).contains("stale"),
                "answered by the live server"
            );
        }
        // Without failover the dead server is asked first for every lookup: 90 names
        // or more. With it: the first message's lookups, then background probes only
        // (each asks a name the live server answered lately; a handful over this run).
        let mut names: Vec<String> = dead.queries().into_iter().map(|q| q.name).collect();
        names.sort();
        names.dedup();
        assert!(!names.is_empty(), "the dead server was tried");
        assert!(
            names.len() < 15,
            "the dead server was asked about {} names for {MESSAGES} messages: {names:?}",
            names.len()
        );
        assert!(
            live.query_count() >= 3 * MESSAGES as u64,
            "the live server answered"
        );
    })
    .await;
}

/// `[dns] stale_cache_file`: a proxy restarted while DNS is down still knows the keys
/// and records it had learnt, and marks what it serves from them stale.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_restart_during_an_outage_keeps_the_known_records() {
    bounded(async {
        let keys: Vec<Key> = (0..3).map(|_| Key::new()).collect();
        let mut zone = Zone::new();
        for (i, k) in keys.iter().enumerate() {
            zone = add_domain(zone, &known(i), k);
        }
        let other = Key::new();
        zone = add_domain(zone, &never_seen(0), &other);
        let mut dns = DnsServer::start(zone);
        dns.set_ttl(1);
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("dns-stale.jsonl");
        let dns_toml = format!(
            "nameservers = [\"{}\"]\ntimeout_ms = 500\nattempts = 1\nstale_cache_file = \"{}\"\nstale_cache_interval = \"1s\"\n",
            dns.addr(),
            file.display()
        );
        let mta = FakeMta::start(Script::default()).await;
        let first = proxy_with_dns(&mta, dns_toml.clone()).await;
        for (i, k) in keys.iter().enumerate() {
            let r = send(&first, &known(i), &k.message(&known(i), &format!("warm{i}"))).await;
            assert_eq!(r.code, 250, "{r:?}");
        }
        // Wait (bounded) for a write that holds the three keys.
        let mut written = false;
        for _ in 0..50 {
            let text = std::fs::read_to_string(&file).unwrap_or_default();
            if (0..3).all(|i| text.contains(&format!("s1._domainkey.{}", known(i)))) {
                written = true;
                break;
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
        assert!(written, "the stale cache file was never written");
        drop(first);
        dns.stop();
        tokio::time::sleep(Duration::from_millis(1100)).await;

        let second = proxy_with_dns(&mta, dns_toml).await;
        for (i, k) in keys.iter().enumerate() {
            let r = send(&second, &known(i), &k.message(&known(i), &format!("again{i}"))).await;
            assert_eq!(r.code, 250, "known sender {i} after the restart: {r:?}");
            let ar = last_ar(&mta);
            assert!(ar.contains("dkim=pass (stale key, "), "{ar}");
        }
        let r = send(&second, &never_seen(0), &other.message(&never_seen(0), "x")).await;
        assert_eq!(r.code, 451, "{r:?}");

        // `check --json` (its own process, reading the same file) says which results
        // are stale, and how old.
        let msg = second.dir.path().join("known1.eml");
        std::fs::write(&msg, keys[1].message(&known(1), "check")).unwrap();
        let mut cmd = std::process::Command::new(common::bin());
        cmd.arg("check")
            .arg("--config")
            .arg(&second.config_path)
            .args(["--ip", "127.0.0.1", "--helo", HELO, "--mail-from"])
            .arg(format!("news@{}", known(1)))
            .args(["--rcpt", RCPT, "--json"])
            .arg(&msg);
        let done = common::run_bounded(cmd, second.dir.path(), Duration::from_secs(60)).await;
        assert!(done.success(), "check failed: {}", done.stderr);
        let v: serde_json::Value = serde_json::from_str(done.stdout_text().trim()).unwrap();
        assert_eq!(v["verdict"], "accept", "{v}");
        assert!(v["dkim"][0]["stale_secs"].as_u64().is_some(), "{v}");
        assert!(v["stale"]["dmarc"].as_u64().is_some(), "{v}");
        assert!(
            v["authentication_results"]
                .as_str()
                .is_some_and(|ar| ar.contains("dkim=pass (stale key, ")),
            "{v}"
        );
    })
    .await;
}

/// The same outage with serve-stale off (`stale_max = "0s"`): failing closed, as before
/// issue 20: every message is deferred, known senders' too.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_serve_stale_an_outage_defers_everything() {
    bounded(async {
        let keys: Vec<Key> = (0..KNOWN).map(|_| Key::new()).collect();
        let attacker = Key::new();
        let mut zone = Zone::new();
        for (i, k) in keys.iter().enumerate() {
            zone = add_domain(zone, &known(i), k);
        }
        let mut dns = DnsServer::start(zone);
        dns.set_ttl(1);
        let mta = FakeMta::start(Script::default()).await;
        let proxy = proxy_with_dns(
            &mta,
            format!(
                "nameservers = [\"{}\"]\ntimeout_ms = 500\nattempts = 1\nstale_max = \"0s\"\n",
                dns.addr()
            ),
        )
        .await;
        for (i, k) in keys.iter().enumerate() {
            let r = send(
                &proxy,
                &known(i),
                &k.message(&known(i), &format!("warm{i}")),
            )
            .await;
            assert_eq!(r.code, 250, "warm-up {i}: {r:?}");
        }
        tokio::time::sleep(Duration::from_millis(1500)).await;
        dns.stop();
        let relayed = mta.messages().len();
        for (i, k) in keys.iter().enumerate() {
            let r = send(&proxy, &known(i), &k.message(&known(i), &format!("out{i}"))).await;
            assert_eq!(r.code, 451, "known sender {i}, serve-stale off: {r:?}");
            let r = send(
                &proxy,
                &known(i),
                &attacker.message(&known(i), &format!("sp{i}")),
            )
            .await;
            assert_eq!(r.code, 451, "spoof {i}, serve-stale off: {r:?}");
        }
        assert_eq!(mta.messages().len(), relayed, "nothing relayed");
    })
    .await;
}
