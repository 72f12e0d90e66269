//! DMARC record rules (RFC 7489 §6.6.3 and §6.6.4, RFC 9989): through `mailwarden check
//! --json` against the loopback DNS server, and the ones an attacker (or a careless
//! domain owner) meets first through the real proxy, asserting the final SMTP answer.
//!
//! Every spoof comes from 127.0.0.1 with `MAIL FROM:<x@attacker.example>` (SPF passes for
//! attacker.example, which never aligns) and a From domain that publishes the record
//! under test: DMARC can only fail, so what is asserted is how the record is read.

mod common;
mod dmarc_common;

use std::sync::OnceLock;

use common::bounded;
use common::dns::Zone;
use common::smtp_client::assert_reply;
use dmarc_common::{
    Job, Key, Step, ar_dmarc, check_config, check_json, deliver, message, sign, start_proxy,
};
use serde_json::Value;

const ATTACKER: &str = "x@attacker.example";

fn zone() -> Zone {
    Zone::new()
        .txt("attacker.example", "v=spf1 ip4:127.0.0.1 -all")
        .txt("_dmarc.reject.example", "v=DMARC1; p=reject")
        // Two records: no usable record at that name (and none above it).
        .txt("_dmarc.two.example", "v=DMARC1; p=reject")
        .txt("_dmarc.two.example", "v=DMARC1; p=quarantine")
        // Two at the subdomain: the walk goes on to the parent's record.
        .txt("_dmarc.sub.parent.example", "v=DMARC1; p=none")
        .txt("_dmarc.sub.parent.example", "v=DMARC1; p=none")
        .txt("_dmarc.parent.example", "v=DMARC1; p=reject")
        // Records that do not start with v=DMARC1 are ignored.
        .txt("_dmarc.other.example", "v=DMARC2; p=none")
        .txt("_dmarc.other.example", "hello v=DMARC1; p=none")
        .txt("_dmarc.other.example", "v=DMARC1; p=quarantine")
        .txt("_dmarc.pct0.example", "v=DMARC1; p=reject; pct=0")
        .txt("_dmarc.pct100.example", "v=DMARC1; p=reject; pct=100")
        .txt("_dmarc.pct0q.example", "v=DMARC1; p=quarantine; pct=0")
        .txt("_dmarc.testing.example", "v=DMARC1; p=reject; t=y")
        .txt(
            "_dmarc.badp.example",
            "v=DMARC1; p=hold; rua=mailto:dmarc@badp.example",
        )
        .txt("_dmarc.badp-norua.example", "v=DMARC1; p=hold")
        .txt(
            "_dmarc.org.example",
            "v=DMARC1; p=none; sp=quarantine; np=reject",
        )
        .a("www.org.example", "192.0.2.10")
        .timeout("_dmarc.slow.example")
        // bank.example: p=reject, its DKIM key lookup times out (an aligned temperror).
        .txt("_dmarc.bank.example", "v=DMARC1; p=reject")
        .timeout("s._domainkey.bank.example")
        // The attacker's own key lookup times out.
        .timeout("sel._domainkey.attacker.example")
}

struct Fixture {
    _dir: tempfile::TempDir,
    signed: std::collections::BTreeMap<String, Vec<u8>>,
}

/// The DKIM-signed spoofs (keys not published: their lookups time out).
fn fixture() -> &'static Fixture {
    static F: OnceLock<Fixture> = OnceLock::new();
    F.get_or_init(|| {
        let dir = tempfile::tempdir().expect("tempdir");
        let keys = [
            Key {
                name: "attacker",
                domain: "attacker.example",
                selector: "sel",
            },
            Key {
                name: "bank",
                domain: "bank.example",
                selector: "s",
            },
        ];
        let jobs = [
            Job {
                id: "attacker-signed",
                message: message(
                    "CEO <ceo@reject.example>",
                    "attacker-signed",
                    "Pay now.\r\n",
                ),
                steps: vec![Step::Dkim("attacker")],
            },
            Job {
                id: "bank-signed",
                message: message("CEO <ceo@bank.example>", "bank-signed", "Statement.\r\n"),
                steps: vec![Step::Dkim("bank")],
            },
        ];
        let (_dns, signed) = sign(dir.path(), &keys, &jobs);
        Fixture { _dir: dir, signed }
    })
}

/// `(From domain, dmarc result, applied policy, published policy, verdict, A-R dmarc part)`.
type Case = (
    &'static str,
    &'static str,
    Value,
    Value,
    &'static str,
    &'static str,
);

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn record_rules_through_check() {
    bounded(async {
        let dir = tempfile::tempdir().unwrap();
        let dns = common::dns::DnsServer::start(zone());
        let config = check_config(dir.path(), &dns, &[]);
        let s = |v: &str| Value::String(v.into());
        let cases: Vec<Case> = vec![
            ("reject.example", "fail", s("reject"), s("reject"), "reject",
             "dmarc=fail header.from=reject.example policy.dmarc=reject"),
            ("two.example", "none", Value::Null, Value::Null, "accept",
             "dmarc=none header.from=two.example"),
            ("sub.parent.example", "fail", s("reject"), s("reject"), "reject",
             "dmarc=fail header.from=sub.parent.example policy.dmarc=reject"),
            ("other.example", "fail", s("quarantine"), s("quarantine"), "quarantine",
             "dmarc=fail header.from=other.example policy.dmarc=quarantine"),
            ("pct0.example", "fail", s("quarantine"), s("reject"), "quarantine",
             "dmarc=fail (p=reject, not in the pct=0 sample) header.from=pct0.example policy.dmarc=quarantine"),
            ("pct0q.example", "fail", s("none"), s("quarantine"), "accept",
             "dmarc=fail (p=quarantine, not in the pct=0 sample) header.from=pct0q.example policy.dmarc=none"),
            ("pct100.example", "fail", s("reject"), s("reject"), "reject",
             "dmarc=fail header.from=pct100.example policy.dmarc=reject"),
            ("testing.example", "fail", s("quarantine"), s("reject"), "quarantine",
             "dmarc=fail (p=reject, t=y testing) header.from=testing.example policy.dmarc=quarantine"),
            ("badp.example", "fail", s("none"), s("none"), "accept",
             "dmarc=fail header.from=badp.example policy.dmarc=none"),
            ("badp-norua.example", "none", Value::Null, Value::Null, "accept",
             "dmarc=none header.from=badp-norua.example"),
            ("org.example", "fail", s("none"), s("none"), "accept",
             "dmarc=fail header.from=org.example policy.dmarc=none"),
            ("www.org.example", "fail", s("quarantine"), s("quarantine"), "quarantine",
             "dmarc=fail header.from=www.org.example policy.dmarc=quarantine"),
            ("ghost.org.example", "fail", s("reject"), s("reject"), "reject",
             "dmarc=fail header.from=ghost.org.example policy.dmarc=reject"),
            ("slow.example", "temperror", Value::Null, Value::Null, "defer",
             "dmarc=temperror header.from=slow.example"),
        ];
        let mut failures = Vec::new();
        for (domain, result, applied, published, verdict, ar) in cases {
            let msg = message(&format!("<ceo@{domain}>"), domain, "Hello.\r\n");
            let v = check_json(&config, dir.path(), ATTACKER, msg.as_bytes(), domain).await;
            let got = (
                v["dmarc"]["result"].clone(),
                v["dmarc"]["policy"].clone(),
                v["dmarc"]["published_policy"].clone(),
                v["verdict"].clone(),
                ar_dmarc(&v),
            );
            let want = (s(result), applied, published, s(verdict), ar.to_string());
            if got != want {
                failures.push(format!("{domain}:\n  got  {got:?}\n  want {want:?}\n  {v}"));
            }
        }
        assert!(failures.is_empty(), "{}", failures.join("\n"));
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn only_alignable_identifiers_make_temperror_through_check() {
    bounded(async {
        let f = fixture();
        let dir = tempfile::tempdir().unwrap();
        let dns = common::dns::DnsServer::start(zone());
        let config = check_config(dir.path(), &dns, &[]);
        // The attacker's own signature times out: DMARC still fails, the verdict rejects.
        let v = check_json(
            &config,
            dir.path(),
            ATTACKER,
            &f.signed["attacker-signed"],
            "a",
        )
        .await;
        assert_eq!(v["dkim"][0]["result"], "temperror", "{v}");
        assert_eq!(v["dkim"][0]["domain"], "attacker.example", "{v}");
        assert_eq!(v["dmarc"]["result"], "fail", "{v}");
        assert_eq!(v["verdict"], "reject", "{v}");
        // The From domain's own signature times out: it could have passed, so temperror.
        let v = check_json(&config, dir.path(), ATTACKER, &f.signed["bank-signed"], "b").await;
        assert_eq!(v["dkim"][0]["result"], "temperror", "{v}");
        assert_eq!(v["dmarc"]["result"], "temperror", "{v}");
        assert_eq!(v["verdict"], "defer", "{v}");
        // The attacker's key lookup outlasts the whole time budget (a 2 s DNS timeout
        // against a 1 s budget): DKIM is cut short, but DMARC discovery ran beside it, so
        // the spoof is still a DMARC fail and rejected.
        let slow = dir.path().join("slow.toml");
        std::fs::write(
            &slow,
            format!(
                "[dns]\nnameservers = [\"{}\"]\ntimeout_ms = 2000\nattempts = 1\n\n[auth]\ntime_budget = \"1s\"\nspf_time_budget = \"1s\"\n",
                dns.nameserver()
            ),
        )
        .unwrap();
        let v = check_json(&slow, dir.path(), ATTACKER, &f.signed["attacker-signed"], "c").await;
        assert_eq!(v["dkim"][0]["result"], "temperror", "{v}");
        assert_eq!(v["dkim"][0]["reason"], "time budget exhausted", "{v}");
        assert_eq!(v["dmarc"]["result"], "fail", "{v}");
        assert_eq!(v["verdict"], "reject", "{v}");
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn proxy_two_records_is_no_policy() {
    bounded(async {
        let env = start_proxy(zone(), &[]).await;
        let msg = message("<ceo@two.example>", "two", "Hello.\r\n");
        let r = deliver(&env.proxy, ATTACKER, msg.as_bytes()).await;
        assert_reply(&r, "250", "two _dmarc records: no DMARC policy, relayed");
        let got = env.mta.messages();
        assert_eq!(got.len(), 1, "{}", env.mta.transcripts_debug());
        let data = String::from_utf8_lossy(&got[0].data).to_string();
        assert!(
            data.contains("dmarc=none header.from=two.example"),
            "{data}"
        );
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn proxy_pct0_never_rejects_pct100_does() {
    bounded(async {
        let env = start_proxy(zone(), &[]).await;
        // pct=0: the next lower policy, quarantine (held, 250), every time.
        for i in 0..3 {
            let msg = message("<ceo@pct0.example>", &format!("pct0-{i}"), "Hello.\r\n");
            let r = deliver(&env.proxy, ATTACKER, msg.as_bytes()).await;
            assert_reply(&r, "250", "p=reject; pct=0: quarantined, never rejected");
        }
        assert!(env.mta.messages().is_empty(), "{}", env.mta.transcripts_debug());
        let msg = message("<ceo@pct100.example>", "pct100", "Hello.\r\n");
        let r = deliver(&env.proxy, ATTACKER, msg.as_bytes()).await;
        assert_reply(&r, "550 5.7.1", "p=reject; pct=100: rejected");
        // The verdict log names the applied and the published policy.
        let log = env.proxy.log();
        assert!(
            log.contains("dmarc=fail (p=reject, not in the pct=0 sample) header.from=pct0.example policy.dmarc=quarantine"),
            "{log}"
        );
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn proxy_attacker_key_timeout_is_still_rejected() {
    bounded(async {
        let f = fixture();
        let env = start_proxy(zone(), &[]).await;
        let r = deliver(&env.proxy, ATTACKER, &f.signed["attacker-signed"]).await;
        assert_reply(
            &r,
            "550 5.7.1",
            "p=reject spoof with an attacker-domain DKIM key timing out: 550, not 451",
        );
        assert!(env.mta.messages().is_empty());
    })
    .await;
}
