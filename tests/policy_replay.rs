//! Issue 15: the decision log and `mailwarden policy replay`, end to end.
//!
//! 2,000 transactions go through the real proxy (built-in policy) with a zone that mixes
//! aligned passes, DMARC failures under p=reject / p=quarantine / p=none, own-domain and
//! look-alike spoofs, and a mailing list that signs what it forwards. Then the same
//! traffic goes through two fresh proxies, one under a stricter and one under a looser
//! policy file. What each proxy did is read off the wire (the client's reply, the next
//! hop's copy and its verdict header), never off the log. The replay of the first
//! proxy's decision log through each policy file must give the same old × new matrix,
//! cell by cell, as pairing the first run with the fresh one, message by message.

mod common;

use std::collections::BTreeMap;
use std::path::Path;
use std::process::Command;
use std::time::Duration;

use base64::Engine;
use common::dns::{DnsServer, Zone};
use common::fake_mta::{FakeMta, Script};
use common::{Proxy, ProxyOptions, bin};

const TRANSACTIONS: usize = 2_000;
const CLIENTS: usize = 8;
/// Messages per connection (under `[limits] max_transactions`).
const PER_CONNECTION: usize = 50;
const RCPT: &str = "user@example.org";

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

        /// The `DKIM-Signature` field for `message`, one line, CRLF-ended.
        pub fn sign(&self, domain: &str, message: &[u8]) -> String {
            let key = Ed25519Key::from_pkcs8_der(&self.pkcs8).expect("key");
            let sig = DkimSigner::from_key(key)
                .domain(domain)
                .selector("s1")
                .headers(["From", "To", "Subject", "Message-ID", "List-Id"])
                .header_canonicalization(Canonicalization::Relaxed)
                .body_canonicalization(Canonicalization::Relaxed)
                .sign(message)
                .expect("sign");
            let h = sig.to_header();
            format!("{}\r\n", h.trim_end_matches("\r\n").replace("\r\n", ""))
        }
    }
}

fn zone(signer: &dkim::Signer) -> Zone {
    let key = base64::engine::general_purpose::STANDARD.encode(&signer.public);
    Zone::new()
        .txt("pass.example", "v=spf1 ip4:127.0.0.1 -all")
        .txt("_dmarc.pass.example", "v=DMARC1; p=reject")
        .txt("rej.example", "v=spf1 -all")
        .txt("_dmarc.rej.example", "v=DMARC1; p=reject")
        .txt("quar.example", "v=spf1 -all")
        .txt("_dmarc.quar.example", "v=DMARC1; p=quarantine")
        .txt("none.example", "v=spf1 -all")
        .txt("_dmarc.none.example", "v=DMARC1; p=none")
        .txt("lists.example.net", "v=spf1 ip4:127.0.0.1 -all")
        .txt(
            "s1._domainkey.lists.example.net",
            &format!("v=DKIM1; k=ed25519; p={key}"),
        )
}

/// The kinds of traffic, cycled: (name, MAIL FROM, From, List-Id).
const KINDS: &[(&str, &str, &str, Option<&str>)] = &[
    ("aligned pass", "a@pass.example", "a@pass.example", None),
    (
        "spoof under p=reject",
        "a@rej.example",
        "a@rej.example",
        None,
    ),
    (
        "fail under p=quarantine",
        "a@quar.example",
        "a@quar.example",
        None,
    ),
    (
        "fail under p=none",
        "a@none.example",
        "a@none.example",
        None,
    ),
    (
        "own-domain spoof",
        "a@none.example",
        "ceo@example.org",
        None,
    ),
    ("look-alike domain", "a@examp1e.org", "a@examp1e.org", None),
    (
        "list, signed by the list",
        "bounce@lists.example.net",
        "a@rej.example",
        Some("<news.lists.example.net>"),
    ),
];

/// Message `i`: unique Message-ID and a body the log must never hold.
fn message(signer: &dkim::Signer, i: usize) -> (String, Vec<u8>) {
    let (_, mail_from, from, list) = KINDS[i % KINDS.len()];
    let mut m = format!(
        "From: <{from}>\r\nTo: <{RCPT}>\r\nSubject: m{i}\r\nMessage-ID: <m{i}@replay.test>\r\n"
    );
    if let Some(l) = list {
        m.push_str(&format!("List-Id: {l}\r\n"));
    }
    m.push_str(&format!("\r\nBODY-SECRET-{i}\r\n"));
    if list.is_some() {
        let sig = signer.sign("lists.example.net", m.as_bytes());
        m.insert_str(0, &sig);
    }
    (mail_from.to_string(), m.into_bytes())
}

fn options(mta: &FakeMta, dns: &DnsServer, policy: Option<&Path>) -> ProxyOptions {
    let mut o = ProxyOptions::smtp(mta.addr);
    o.auth = true;
    o.role = "inbound".into();
    o.local_domains = vec!["example.org".into()];
    o.dns_nameserver = Some(dns.nameserver());
    if let Some(p) = policy {
        o.auth_extra
            .push(format!("policy_file = {:?}", p.to_str().unwrap()));
    }
    o
}

/// Sends every message; returns message index → the client's reply code and text.
async fn send_all(proxy: &Proxy, signer: &std::sync::Arc<dkim::Signer>) -> Vec<(u16, String)> {
    let mut tasks = Vec::new();
    for c in 0..CLIENTS {
        let addr = proxy.addr;
        let signer = signer.clone();
        tasks.push(tokio::spawn(async move {
            let mut out = Vec::new();
            let mine: Vec<usize> = (0..TRANSACTIONS).filter(|i| i % CLIENTS == c).collect();
            for chunk in mine.chunks(PER_CONNECTION) {
                let mut client = common::smtp_client::Client::connect(addr).await;
                let greeting = client.read_reply().await;
                assert_eq!(greeting.code, 220);
                client.ehlo("client.replay.test").await;
                for &i in chunk {
                    let (mail_from, body) = message(&signer, i);
                    let r = client.send_mail(&mail_from, &[RCPT], &body).await;
                    out.push((i, r.code, r.full_text()));
                    if r.code >= 400 {
                        client.cmd("RSET").await;
                    }
                }
                client.cmd("QUIT").await;
            }
            out
        }));
    }
    let mut replies = vec![(0u16, String::new()); TRANSACTIONS];
    for t in tasks {
        for (i, code, text) in t.await.expect("client task") {
            replies[i] = (code, text);
        }
    }
    replies
}

/// What the proxy did with each message, from the wire: 5xx reject, 4xx defer; a 250
/// for a message the next hop got is tag when its copy carries our verdict header
/// saying so, accept otherwise; a 250 ("queued as") for one it never got is quarantine.
fn wire_actions(replies: &[(u16, String)], mta: &FakeMta) -> Vec<&'static str> {
    let mut relayed: BTreeMap<usize, bool> = BTreeMap::new();
    for m in mta.messages() {
        let text = m.data_str();
        let id = text
            .split("Message-ID: <m")
            .nth(1)
            .and_then(|s| s.split('@').next())
            .and_then(|n| n.parse::<usize>().ok())
            .expect("our Message-ID at the next hop");
        let tagged = text.contains("X-Mailwarden-Verdict: tag");
        assert!(relayed.insert(id, tagged).is_none(), "m{id} relayed twice");
    }
    replies
        .iter()
        .enumerate()
        .map(|(i, (code, text))| match code {
            500..=599 => "reject",
            400..=499 => "defer",
            250 => match relayed.get(&i) {
                Some(true) => "tag",
                Some(false) => "accept",
                None => {
                    assert!(text.contains("queued as"), "m{i}: 250 but nowhere: {text}");
                    "quarantine"
                }
            },
            _ => panic!("m{i}: unexpected reply {code} {text}"),
        })
        .collect()
}

/// `mailwarden policy replay --json` over the proxy's log.
fn replay(proxy: &Proxy, policy: &Path, extra: &[&str]) -> serde_json::Value {
    let out = Command::new(bin())
        .arg("-c")
        .arg(&proxy.config_path)
        .args(["policy", "replay", "--policy"])
        .arg(policy)
        .arg("--json")
        .args(extra)
        .output()
        .expect("run policy replay");
    assert!(
        out.status.success(),
        "policy replay: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).expect("replay JSON")
}

/// The log holds every transaction once its writer caught up (bounded wait).
async fn wait_logged(proxy: &Proxy, policy: &Path) -> serde_json::Value {
    for _ in 0..100 {
        let r = replay(proxy, policy, &[]);
        if r["total"].as_u64() == Some(TRANSACTIONS as u64) {
            return r;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    panic!("the decision log never reached {TRANSACTIONS} records");
}

fn matrix_of(replay: &serde_json::Value) -> BTreeMap<String, u64> {
    replay["matrix"]
        .as_object()
        .expect("matrix")
        .iter()
        .map(|(k, v)| (k.clone(), v["count"].as_u64().unwrap()))
        .collect()
}

fn pair_matrix(old: &[&str], new: &[&str]) -> BTreeMap<String, u64> {
    let mut m = BTreeMap::new();
    for (o, n) in old.iter().zip(new) {
        *m.entry(format!("{o}→{n}")).or_default() += 1;
    }
    m
}

const STRICTER: &str = r#"
[[rule]]
name = "temperror-defer"
temperror = true
action = "defer"

[[rule]]
name = "dmarc-fail-reject"
dmarc = ["fail"]
action = "reject"

[[rule]]
name = "spoof-reject"
flags = ["own-domain-spoof", "display-name-spoof", "lookalike-domain"]
action = "reject"
"#;

const LOOSER: &str = r#"
[[rule]]
name = "known-lists"
list_id = ["lists.example.net"]
dmarc = ["fail"]
action = "tag"

[[rule]]
name = "temperror-defer"
temperror = true
action = "defer"

[[rule]]
name = "dmarc-reject"
dmarc = ["fail"]
dmarc_policy = ["reject"]
action = "reject"

[[rule]]
name = "dmarc-quarantine-tag"
dmarc = ["fail"]
dmarc_policy = ["quarantine"]
action = "tag"

[[rule]]
name = "own-domain"
flags = ["own-domain-spoof"]
action = "quarantine"
"#;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replay_matrix_equals_a_fresh_run_under_each_policy() {
    common::bounded(async {
        let signer = std::sync::Arc::new(dkim::Signer::new());
        let dns = DnsServer::start(zone(&signer));
        let files = tempfile::tempdir().unwrap();
        let stricter = files.path().join("stricter.toml");
        let looser = files.path().join("looser.toml");
        std::fs::write(&stricter, STRICTER).unwrap();
        std::fs::write(&looser, LOOSER).unwrap();

        // The day of mail, under the built-in policy, logged.
        let mta = FakeMta::start(Script::default()).await;
        let proxy = Proxy::start(options(&mta, &dns, None)).await;
        let replies = send_all(&proxy, &signer).await;
        let base = wire_actions(&replies, &mta);
        let kinds: std::collections::BTreeSet<&str> = base.iter().copied().collect();
        assert_eq!(
            kinds,
            ["accept", "quarantine", "reject"].into_iter().collect(),
            "the baseline mixes outcomes"
        );

        let strict_replay = wait_logged(&proxy, &stricter).await;
        let loose_replay = replay(&proxy, &looser, &["--changed"]);
        // The text form: the matrix, then each cell's rules and examples.
        let text = Command::new(bin())
            .arg("-c")
            .arg(&proxy.config_path)
            .args(["policy", "replay", "--policy"])
            .arg(&looser)
            .args(["--from", "2020-01-01"])
            .output()
            .unwrap();
        let text = String::from_utf8_lossy(&text.stdout).into_owned();
        eprintln!("{text}");
        assert!(
            text.starts_with(&format!("{TRANSACTIONS} transactions replayed, ")),
            "{text}"
        );
        assert!(text.contains("reject → tag: "), "{text}");
        assert!(
            text.contains("  rule dmarc-reject → known-lists: "),
            "{text}"
        );
        assert!(text.contains("id <m6@replay.test>"), "{text}");

        // The log matches the wire, message by message, and holds no body.
        let log_dir = proxy.dir.path().join("var/decision-log");
        let mut logged = 0;
        for entry in std::fs::read_dir(&log_dir).unwrap() {
            let text = std::fs::read_to_string(entry.unwrap().path()).unwrap();
            assert!(
                !text.contains("BODY-SECRET"),
                "a body reached the decision log"
            );
            for line in text.lines() {
                let r: serde_json::Value = serde_json::from_str(line).unwrap();
                let id = r["headers"]["message_id"].as_str().unwrap();
                let i: usize = id[2..id.find('@').unwrap()].parse().unwrap();
                assert_eq!(r["action"], base[i], "m{i}: {line}");
                assert_eq!(r["stage"], "policy");
                let digest = r["digest"].as_str().unwrap();
                assert!(
                    digest
                        .strip_prefix("blake3:")
                        .is_some_and(|h| h.len() == 64),
                    "{digest}"
                );
                if i % KINDS.len() == 6 {
                    assert_eq!(r["inputs"]["list_id"], "news.lists.example.net", "{line}");
                }
                if base[i] == "quarantine" {
                    assert_eq!(r["quarantine_id"].as_str().unwrap().len(), 26, "{line}");
                }
                logged += 1;
            }
        }
        assert_eq!(logged, TRANSACTIONS);
        drop(proxy);

        // Fresh proxies under each policy, same traffic.
        for (name, policy, replayed) in [
            ("stricter", &stricter, &strict_replay),
            ("looser", &looser, &loose_replay),
        ] {
            let mta = FakeMta::start(Script::default()).await;
            let fresh = Proxy::start(options(&mta, &dns, Some(policy))).await;
            let replies = send_all(&fresh, &signer).await;
            let actual = wire_actions(&replies, &mta);
            let expected = pair_matrix(&base, &actual);
            assert_eq!(matrix_of(replayed), expected, "{name}: replay vs fresh run");
            let changed = base.iter().zip(&actual).filter(|(a, b)| a != b).count();
            assert!(changed > 0, "{name}: the policy changes something");
            assert_eq!(replayed["changed"].as_u64(), Some(changed as u64), "{name}");
        }
        // The stricter policy refuses what the baseline let through or held...
        assert!(matrix_of(&strict_replay)["accept→reject"] > 0);
        assert!(matrix_of(&strict_replay)["quarantine→reject"] > 0);
        // ...the looser one tags the signed list, and says which rule did it.
        let cell = &loose_replay["matrix"]["reject→tag"];
        assert!(cell["count"].as_u64().unwrap() > 0);
        assert!(
            cell["rules"]
                .as_object()
                .unwrap()
                .contains_key("dmarc-reject → known-lists"),
            "{cell}"
        );
        assert!(cell["examples"][0]["message_id"].as_str().is_some());
        let changed_list = loose_replay["changed_list"].as_array().unwrap();
        assert_eq!(
            changed_list.len() as u64,
            loose_replay["changed"].as_u64().unwrap()
        );
    })
    .await;
}

fn cli(proxy: &Proxy, args: &[&str]) -> (bool, String, String) {
    let out = Command::new(bin())
        .arg("-c")
        .arg(&proxy.config_path)
        .args(args)
        .output()
        .expect("run mailwarden");
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// `quarantine release --where-policy`: releases exactly the held entries the new
/// policy accepts (not those it would only tag, not those it still holds), once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn release_where_policy_releases_what_the_new_policy_accepts_once() {
    common::bounded(async {
        let signer = std::sync::Arc::new(dkim::Signer::new());
        let dns = DnsServer::start(zone(&signer));
        let mta = FakeMta::start(Script::default()).await;
        let proxy = Proxy::start(options(&mta, &dns, None)).await;
        // Held by the built-in policy: p=quarantine failures (2, 9), own-domain spoofs
        // (4, 11) and look-alikes (5, 12).
        let mut client = proxy.connect().await;
        client.read_reply().await;
        client.ehlo("client.replay.test").await;
        let mut held = BTreeMap::new();
        for i in [2usize, 4, 5, 9, 11, 12] {
            let (mail_from, body) = message(&signer, i);
            let r = client.send_mail(&mail_from, &[RCPT], &body).await;
            assert_eq!(r.code, 250, "m{i}: {r:?}");
            let id = r.full_text().rsplit(' ').next().unwrap().to_string();
            held.insert(i, id);
        }
        client.cmd("QUIT").await;
        // Accept look-alikes, tag p=quarantine failures, keep holding own-domain spoofs.
        let policy = proxy.dir.path().join("new.toml");
        std::fs::write(
            &policy,
            "[[rule]]\nname = \"quar-tag\"\ndmarc = [\"fail\"]\ndmarc_policy = [\"quarantine\"]\naction = \"tag\"\n\n\
             [[rule]]\nname = \"own\"\nflags = [\"own-domain-spoof\"]\naction = \"quarantine\"\n",
        )
        .unwrap();
        let policy = policy.to_str().unwrap();
        let want: Vec<&String> = [5usize, 12].iter().map(|i| &held[i]).collect();
        // The writer thread flushes each batch; wait until all six are logged.
        let mut listed = String::new();
        for _ in 0..100 {
            let (ok, out, err) = cli(
                &proxy,
                &["quarantine", "release", "--where-policy", policy, "--dry-run"],
            );
            assert!(ok, "{err}");
            listed = out;
            if want.iter().all(|id| listed.contains(id.as_str())) {
                break;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        assert!(listed.contains("2 entries would be released"), "{listed}");
        for (i, id) in &held {
            assert_eq!(listed.contains(id.as_str()), i % 7 == 5, "m{i} {id}: {listed}");
        }
        assert!(mta.messages().is_empty(), "a dry run releases nothing");

        let (ok, out, err) = cli(&proxy, &["quarantine", "release", "--where-policy", policy]);
        assert!(ok, "{out}{err}");
        assert!(err.contains("2 held entries would only be tagged"), "{err}");
        let delivered: Vec<String> = mta.messages().iter().map(|m| m.data_str()).collect();
        assert_eq!(delivered.len(), 2, "{out}");
        for i in [5, 12] {
            assert!(delivered.iter().any(|d| d.contains(&format!("<m{i}@replay.test>"))));
        }
        // Once: released entries are not candidates any more.
        let (ok, out, _) = cli(&proxy, &["quarantine", "release", "--where-policy", policy]);
        assert!(ok);
        assert_eq!(mta.messages().len(), 2, "released twice: {out}");
    })
    .await;
}

/// `check-config` runs the tests a policy names (`tests = [...]`): a policy that fails
/// one of its cases fails the check with the diff; fixed, it passes.
#[test]
fn check_config_runs_the_policy_tests_it_names() {
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("mailwarden.toml");
    std::fs::write(
        &config,
        "local_domains = [\"example.org\"]\n[[listener]]\naddress = \"127.0.0.1:2525\"\n\
         [auth]\npolicy_file = \"policy.toml\"\n",
    )
    .unwrap();
    std::fs::write(
        dir.path().join("cases.toml"),
        "[[case]]\nname = \"p=reject spoof\"\ndmarc = \"fail\"\ndmarc_policy = \"reject\"\n\
         from_domain = \"bank.example\"\nexpect = \"reject\"\n",
    )
    .unwrap();
    let check = |policy: &str| {
        std::fs::write(dir.path().join("policy.toml"), policy).unwrap();
        let out = Command::new(bin())
            .arg("-c")
            .arg(&config)
            .arg("check-config")
            .output()
            .unwrap();
        (
            out.status.success(),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        )
    };
    let lenient = "tests = [\"cases.toml\"]\n[[rule]]\nname = \"lenient\"\ndmarc = [\"fail\"]\naction = \"tag\"\n";
    let (ok, err) = check(lenient);
    assert!(!ok, "a failing case must fail check-config");
    assert!(err.contains("FAIL p=reject spoof"), "{err}");
    assert!(err.contains("got:      tag by rule lenient"), "{err}");
    let strict = "tests = [\"cases.toml\"]\n[[rule]]\nname = \"strict\"\ndmarc = [\"fail\"]\naction = \"reject\"\n";
    let (ok, err) = check(strict);
    assert!(ok, "{err}");
    // A named file that is missing is an error, not a pass.
    let (ok, err) = check("tests = [\"missing.toml\"]\n");
    assert!(!ok && err.contains("missing.toml"), "{err}");
}
