//! Ways around the DMARC verdict, tried as an attacker would, through the real proxy
//! (README "Ways around the verdict"). Every test starts `mailwarden run` with an inbound
//! listener for `example.org` (and `lenient.example.org`), the loopback DNS server of
//! tests/common/dns.rs, and a fake next hop; the attacker connects from 127.0.0.1.
//!
//! `bank.example` publishes `p=reject` and does not authorise 127.0.0.1, so any mail
//! claiming it fails DMARC; `attacker.example` authorises 127.0.0.1 (SPF passes and aligns
//! for its own From) with no DMARC record. Each test asserts the SMTP answer and what the
//! next hop received (nothing, for a refusal).

mod common;

use std::path::Path;
use std::process::Command;
use std::time::Duration;

use common::dns::{DnsServer, Zone};
use common::fake_mta::{FakeMta, Script};
use common::smtp_client::{Reply, assert_reply};
use common::{Proxy, ProxyOptions, run_bounded, show};

const HELO: &str = "mx.attacker.example";
const RCPT: &str = "ceo@example.org";
const LENIENT_RCPT: &str = "sales@lenient.example.org";

fn zone() -> Zone {
    Zone::new()
        .txt("bank.example", "v=spf1 -all")
        .txt("_dmarc.bank.example", "v=DMARC1; p=reject")
        .txt("attacker.example", "v=spf1 ip4:127.0.0.1 -all")
        .txt("weak.example", "v=spf1 -all")
        .txt("_dmarc.weak.example", "v=DMARC1; p=none")
}

struct Env {
    _dns: DnsServer,
    mta: FakeMta,
    proxy: Proxy,
}

async fn start(f: impl FnOnce(ProxyOptions, &Path) -> ProxyOptions) -> Env {
    let dns = DnsServer::start(zone());
    let mta = FakeMta::start(Script::default()).await;
    let dir = tempfile::tempdir().expect("tempdir");
    let mut o = ProxyOptions::smtp(mta.addr);
    o.auth = true;
    o.role = "inbound".into();
    o.local_domains = vec!["example.org".into(), "lenient.example.org".into()];
    o.dns_nameserver = Some(dns.nameserver());
    let o = f(o, dir.path());
    let proxy = Proxy::start_in(o, dir).await;
    Env {
        _dns: dns,
        mta,
        proxy,
    }
}

/// A policy file in `dir`, referenced from `[auth]`.
fn with_policy(mut o: ProxyOptions, dir: &Path, rules: &str) -> ProxyOptions {
    let path = dir.join("policy.toml");
    std::fs::write(&path, rules).expect("write policy");
    o.auth_extra
        .push(format!("policy_file = {:?}", path.display().to_string()));
    o
}

/// `headers` (each line ending in CRLF) and a short body.
fn message(headers: &str) -> Vec<u8> {
    format!(
        "{headers}To: <{RCPT}>\r\nDate: Tue, 25 Nov 2025 10:00:00 +0000\r\nMessage-ID: <{}@attacker.example>\r\n\r\nPlease pay the invoice today.\r\n",
        std::process::id()
    )
    .into_bytes()
}

/// One session: MAIL, the RCPTs (their replies), DATA when one was accepted.
async fn send(
    proxy: &Proxy,
    mail_from: &str,
    rcpts: &[&str],
    msg: &[u8],
) -> (Vec<Reply>, Option<Reply>) {
    let mut c = proxy.connect_ehlo(HELO).await;
    let r = c.cmd(&format!("MAIL FROM:<{mail_from}>")).await;
    assert_reply(&r, "250", "MAIL");
    let mut replies = Vec::new();
    for rcpt in rcpts {
        replies.push(c.cmd(&format!("RCPT TO:<{rcpt}>")).await);
    }
    let data = if replies.iter().any(|r| r.code == 250) {
        Some(c.data(msg).await)
    } else {
        None
    };
    c.cmd("QUIT").await;
    (replies, data)
}

async fn data_reply(env: &Env, mail_from: &str, msg: &[u8]) -> Reply {
    let (rcpts, data) = send(&env.proxy, mail_from, &[RCPT], msg).await;
    assert_reply(&rcpts[0], "250", "RCPT");
    data.expect("DATA reply")
}

fn assert_refused_unseen(env: &Env, r: &Reply, what: &str) {
    assert_reply(r, "550 5.7.1", what);
    assert!(
        env.mta.messages().is_empty(),
        "{what}: the next hop must receive nothing; it saw:\n{}",
        env.mta.transcripts_debug()
    );
}

// ---------------------------------------------------------------------------
// Header sanity: one author
// ---------------------------------------------------------------------------

#[tokio::test]
async fn two_from_fields_in_either_order_are_refused() {
    let env = start(|o, _| o).await;
    for headers in [
        "From: CEO <ceo@bank.example>\r\nFrom: x@attacker.example\r\nSubject: a\r\n",
        "From: x@attacker.example\r\nFrom: CEO <ceo@bank.example>\r\nSubject: b\r\n",
        // The obsolete `From :` spelling is the same field.
        "From: x@attacker.example\r\nFROM : ceo@bank.example\r\nSubject: c\r\n",
    ] {
        let r = data_reply(&env, "x@attacker.example", &message(headers)).await;
        assert_refused_unseen(&env, &r, headers);
        assert!(r.text().contains("From header fields"), "{}", r.full_text());
    }
    let log = env.proxy.log();
    assert!(
        log.contains("header-sanity"),
        "trace names the stage:\n{log}"
    );
}

#[tokio::test]
async fn one_from_field_with_two_domains_or_none_is_refused() {
    let env = start(|o, _| o).await;
    for headers in [
        "From: x@attacker.example, Boss <boss@bank.example>\r\nSubject: a\r\n",
        "Subject: no author\r\n",
        // A display name written as a bare address hides a second author.
        "From: ceo@bank.example <x@attacker.example>\r\nSubject: b\r\n",
        "From: undisclosed:;\r\nSubject: c\r\n",
    ] {
        let r = data_reply(&env, "x@attacker.example", &message(headers)).await;
        assert_refused_unseen(&env, &r, headers);
    }
}

#[tokio::test]
async fn several_mailboxes_of_one_domain_are_one_author() {
    let env = start(|o, _| o).await;
    let msg = message("From: a@attacker.example, \"B\" <b@Attacker.Example>\r\nSubject: ok\r\n");
    let r = data_reply(&env, "x@attacker.example", &msg).await;
    assert_reply(&r, "250", "one author domain, SPF aligned");
    let m = &env.mta.messages()[0];
    assert!(
        m.data_str()
            .contains("dmarc=none header.from=attacker.example"),
        "{}",
        m.data_str()
    );
}

#[tokio::test]
async fn two_subject_fields_are_refused() {
    let env = start(|o, _| o).await;
    let msg = message("From: x@attacker.example\r\nSubject: hello\r\nSubject: invoice\r\n");
    let r = data_reply(&env, "x@attacker.example", &msg).await;
    assert_refused_unseen(&env, &r, "two Subject fields");
}

#[tokio::test]
async fn the_sanity_action_is_configurable_and_check_agrees() {
    let env = start(|mut o, _| {
        o.auth_extra.push("malformed_from = \"defer\"".into());
        o
    })
    .await;
    // The first From passes on its own (SPF aligned), so the sanity action decides; the
    // stricter of it and the rules' verdict would win (a DMARC reject stays a reject).
    let msg = message("From: x@attacker.example\r\nFrom: ceo@bank.example\r\nSubject: a\r\n");
    let r = data_reply(&env, "x@attacker.example", &msg).await;
    assert_reply(&r, "451 4.7.1", "malformed_from = defer");
    let other = message("From: ceo@bank.example\r\nFrom: x@attacker.example\r\nSubject: b\r\n");
    let r = data_reply(&env, "x@attacker.example", &other).await;
    assert_reply(
        &r,
        "550 5.7.1",
        "defer does not soften the first From's DMARC reject",
    );

    // `check` runs the same stage and says which problem it found.
    let eml = env.proxy.dir.path().join("two-from.eml");
    std::fs::write(&eml, &msg).unwrap();
    let mut cmd = Command::new(common::bin());
    cmd.arg("check")
        .arg("--config")
        .arg(env.proxy.dir.path().join("mailwarden.toml"))
        .args(["--ip", "127.0.0.1", "--helo", HELO])
        .args([
            "--mail-from",
            "x@attacker.example",
            "--rcpt",
            RCPT,
            "--json",
        ])
        .arg(&eml);
    let out = run_bounded(cmd, env.proxy.dir.path(), Duration::from_secs(60)).await;
    assert!(out.success(), "check failed: {}", out.stdout_text());
    let v: serde_json::Value = serde_json::from_str(&out.stdout_text()).expect("check JSON");
    assert_eq!(v["header_sanity"], "several-from-fields", "{v}");
    assert_eq!(v["verdict"], "defer", "{v}");
    assert_eq!(v["trace"][0]["rule"], "header-sanity", "{v}");
}

// ---------------------------------------------------------------------------
// Rules on sender-controlled data
// ---------------------------------------------------------------------------

#[tokio::test]
async fn a_list_id_header_does_not_downgrade_a_reject() {
    let example = common::repo_path("config/policy.example.toml");
    let env = start(|mut o, _| {
        o.auth_extra
            .push(format!("policy_file = {:?}", example.display().to_string()));
        o
    })
    .await;
    let msg = message(
        "From: CEO <ceo@bank.example>\r\nList-Id: Example list <lists.example.net>\r\nSubject: pay\r\n",
    );
    let r = data_reply(&env, "ceo@bank.example", &msg).await;
    assert_refused_unseen(&env, &r, "spoof with a copied List-Id");
    let log = env.proxy.log();
    assert!(log.contains("known-lists=no"), "trace:\n{log}");
}

#[tokio::test]
async fn one_recipients_lenient_rule_never_carries_another() {
    let rules = "[[rule]]\nname = \"lenient-sales\"\nrcpt_domain = [\"lenient.example.org\"]\ndmarc = [\"fail\"]\naction = \"tag\"\n\n[[rule]]\nname = \"dmarc-reject\"\ndmarc = [\"fail\"]\ndmarc_policy = [\"reject\"]\naction = \"reject\"\n";
    let env = start(|o, dir| with_policy(o, dir, rules)).await;
    let msg = message("From: CEO <ceo@bank.example>\r\nSubject: pay\r\n");

    // Strict recipient first: the lenient one must wait for its own transaction.
    let (rcpts, data) = send(&env.proxy, "ceo@bank.example", &[RCPT, LENIENT_RCPT], &msg).await;
    assert_reply(&rcpts[0], "250", "first RCPT");
    assert_reply(&rcpts[1], "452 4.5.3", "second RCPT, other policy");
    assert_refused_unseen(&env, &data.unwrap(), "spoof to the strict recipient");

    // Lenient recipient first: the strict one is split off the same way.
    let (rcpts, data) = send(&env.proxy, "ceo@bank.example", &[LENIENT_RCPT, RCPT], &msg).await;
    assert_reply(&rcpts[0], "250", "first RCPT");
    assert_reply(&rcpts[1], "452 4.5.3", "second RCPT, other policy");
    assert_reply(
        &data.unwrap(),
        "250",
        "tagged for the lenient recipient only",
    );
    let msgs = env.mta.messages();
    assert_eq!(msgs.len(), 1);
    assert_eq!(msgs[0].rcpt_addrs(), vec![LENIENT_RCPT.to_string()]);

    // Recipients under the same rules share a transaction as before.
    let (rcpts, _) = send(
        &env.proxy,
        "x@attacker.example",
        &[RCPT, "other@example.org"],
        &message("From: x@attacker.example\r\nSubject: hi\r\n"),
    )
    .await;
    assert_reply(&rcpts[1], "250", "same policy class");
}

#[tokio::test]
async fn check_config_warns_about_rules_on_unauthenticated_fields() {
    let dir = tempfile::tempdir().unwrap();
    let policy = dir.path().join("policy.toml");
    std::fs::write(
        &policy,
        "[[rule]]\nname = \"vip\"\nfrom_domain = [\"bank.example\"]\naction = \"accept\"\n\n[[rule]]\nname = \"dmarc-reject\"\ndmarc = [\"fail\"]\naction = \"reject\"\n",
    )
    .unwrap();
    let config = dir.path().join("mailwarden.toml");
    std::fs::write(
        &config,
        format!(
            "hostname = \"mx.example.org\"\nlocal_domains = [\"example.org\"]\n[[listener]]\naddress = \"127.0.0.1:0\"\nrole = \"inbound\"\n[next_hop]\naddress = \"maildir:{}\"\n[auth]\npolicy_file = {:?}\n",
            dir.path().join("md").display(),
            policy.display().to_string()
        ),
    )
    .unwrap();
    let mut cmd = Command::new(common::bin());
    cmd.arg("check-config").arg("--config").arg(&config);
    let out = run_bounded(cmd, dir.path(), Duration::from_secs(60)).await;
    let stderr = out.stderr.clone();
    let all = format!("{}{}", out.stdout_text(), stderr);
    assert!(
        all.contains("warning:") && all.contains("rule[0] `vip`: accepts"),
        "check-config output:\n{all}"
    );
}

// ---------------------------------------------------------------------------
// Forged results, recipients, tagging
// ---------------------------------------------------------------------------

#[tokio::test]
async fn forged_results_in_every_spelling_of_our_id_are_removed() {
    let env = start(|o, _| o).await;
    let forged = [
        "Authentication-Results: \"mailwarden.test\"; dmarc=pass header.from=bank.example\r\n",
        "Authentication-Results: mailwarden.test.; dmarc=pass header.from=bank.example\r\n",
        "Authentication-Results: (x)MAILWARDEN.TEST(y) 1; dmarc=pass\r\n",
    ]
    .concat();
    let msg = message(&format!(
        "{forged}From: x@attacker.example\r\nSubject: f\r\n"
    ));
    let r = data_reply(&env, "x@attacker.example", &msg).await;
    assert_reply(&r, "250", "aligned sender");
    let got = env.mta.messages()[0].data_str();
    assert_eq!(
        got.matches("Authentication-Results:").count(),
        1,
        "only ours stays:\n{got}"
    );
    assert!(
        got.starts_with("Authentication-Results: mailwarden.test;"),
        "{got}"
    );
    assert!(!got.contains("header.from=bank.example"), "{got}");
}

#[tokio::test]
async fn postmaster_without_a_domain_is_accepted_inbound() {
    let env = start(|o, _| o).await;
    let msg = message("From: x@attacker.example\r\nSubject: abuse report\r\n");
    let (rcpts, data) = send(&env.proxy, "x@attacker.example", &["postmaster"], &msg).await;
    assert_reply(&rcpts[0], "250", "RCPT TO:<postmaster> (RFC 5321 4.5.1)");
    assert_reply(&data.unwrap(), "250", "DATA");
    assert_eq!(env.mta.messages()[0].rcpt_addrs(), vec!["postmaster"]);
}

#[tokio::test]
async fn the_subject_prefix_keeps_8bit_and_encoded_subjects_intact() {
    let rules = "[[rule]]\nname = \"tag-weak\"\ndmarc = [\"fail\"]\naction = \"tag\"\n";
    let env = start(|mut o, dir| {
        o.auth_extra
            .push("subject_prefix = \"[SUSPICIOUS] \"".into());
        with_policy(o, dir, rules)
    })
    .await;
    let cases: [(&[u8], &[u8]); 3] = [
        (
            b"Subject: Caf\xe9 cr\xe8me\r\n",
            b"Subject: [SUSPICIOUS] Caf\xe9 cr\xe8me\r\n",
        ),
        (
            b"Subject: =?UTF-8?B?R3LDvMOfZQ==?=\r\n",
            b"Subject: [SUSPICIOUS] =?UTF-8?B?R3LDvMOfZQ==?=\r\n",
        ),
        (
            b"Subject:  folded\r\n and long\r\n",
            b"Subject: [SUSPICIOUS]  folded\r\n and long\r\n",
        ),
    ];
    for (i, (subject, want)) in cases.iter().enumerate() {
        let mut headers = b"From: x@weak.example\r\n".to_vec();
        headers.extend_from_slice(subject);
        let mut msg = headers.clone();
        msg.extend_from_slice(b"To: <ceo@example.org>\r\n\r\nbody\r\n");
        let r = data_reply(&env, "x@weak.example", &msg).await;
        assert_reply(&r, "250", "tagged");
        let got = env.mta.messages()[i].data.clone();
        assert!(
            common::contains(&got, want),
            "case {i}: subject must be prefixed in place:\n{}",
            show(&got)
        );
        assert_eq!(common::count(&got, b"Subject:"), 1, "{}", show(&got));
    }
}
