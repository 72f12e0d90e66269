//! Trusted ARC sealers (RFC 8617 §7.2) done right, with chains sealed by dkimpy's
//! `arc_sign` and keys served from the loopback DNS server.
//!
//! `bank.example` publishes `p=reject`; every message claims `From: ceo@bank.example` and
//! comes from 127.0.0.1 with `MAIL FROM:<x@attacker.example>`, so DMARC fails at us. An
//! override (DMARC stays `fail`, applied policy `none`) must need all of: a chain that
//! validates, its **most recent** set sealed by a trusted sealer (`sealer.example`), and
//! that set recording a DMARC pass (or an aligned DKIM/SPF pass) for bank.example itself.
//! Each way around one of those is a case here, through `check --json` and through the
//! real proxy (final SMTP answer).

mod common;
mod dmarc_common;

use std::collections::BTreeMap;
use std::sync::OnceLock;

use common::bounded;
use common::dns::{DnsServer, Zone};
use dmarc_common::{
    Job, Key, Step, ar_dmarc, check_config, check_json, deliver, message, sign, start_proxy,
};
use serde_json::Value;

const ATTACKER: &str = "x@attacker.example";
const FROM: &str = "CEO <ceo@bank.example>";
const TRUSTED: &str = "trusted_arc_sealers = [\"sealer.example\"]";

struct Fixture {
    _dir: tempfile::TempDir,
    keys: Vec<(String, String)>,
    signed: BTreeMap<String, Vec<u8>>,
}

/// The sealer's Authentication-Results (what its ARC-Authentication-Results records).
fn ar(srv_id: &str, results: &str) -> Step {
    Step::Prepend(format!("Authentication-Results: {srv_id}; {results}\r\n"))
}

fn jobs() -> Vec<Job> {
    let sealed = |id, subject: &str, results: &str| Job {
        id,
        message: message(FROM, subject, "Statement body.\r\n"),
        steps: vec![
            ar("sealer.example", results),
            Step::Arc {
                key: "sealer",
                srv_id: "sealer.example",
            },
        ],
    };
    vec![
        // Genuine: the trusted sealer saw bank.example's DMARC pass.
        sealed(
            "genuine",
            "genuine",
            "dkim=pass header.d=bank.example header.s=s; dmarc=pass header.from=bank.example",
        ),
        // Genuine, recorded as an aligned DKIM pass of a subdomain (relaxed alignment).
        sealed(
            "genuine-dkim",
            "genuine-dkim",
            "dkim=pass header.d=mail.bank.example header.s=s",
        ),
        // The trusted sealer itself saw DMARC fail.
        sealed(
            "recorded-fail",
            "recorded-fail",
            "spf=pass smtp.mailfrom=attacker.example; dmarc=fail header.from=bank.example",
        ),
        // A pass hidden in a comment around a recorded fail.
        sealed(
            "comment-pass",
            "comment-pass",
            "dmarc=fail (dmarc=pass header.from=bank.example) header.from=bank.example",
        ),
        // A pass for a different From domain.
        sealed(
            "other-domain",
            "other-domain",
            "dkim=pass header.d=other.example; dmarc=pass header.from=other.example",
        ),
        // The genuine set copied onto another message, the attacker's own newer set on top.
        Job {
            id: "copied-resealed",
            message: message(FROM, "copied-resealed", "Pay the attacker.\r\n"),
            steps: vec![
                Step::CopyArcFrom("genuine"),
                ar(
                    "attacker.example",
                    "arc=pass; dmarc=pass header.from=bank.example",
                ),
                Step::Arc {
                    key: "attacker",
                    srv_id: "attacker.example",
                },
            ],
        },
        // The genuine set copied alone: its message signature does not cover this message.
        Job {
            id: "copied-alone",
            message: message(FROM, "copied-alone", "Pay the attacker.\r\n"),
            steps: vec![Step::CopyArcFrom("genuine")],
        },
        // A genuine chain, then the body changed: the chain no longer validates.
        Job {
            id: "broken",
            message: message(FROM, "broken", "Statement body.\r\n"),
            steps: vec![
                ar("sealer.example", "dmarc=pass header.from=bank.example"),
                Step::Arc {
                    key: "sealer",
                    srv_id: "sealer.example",
                },
                Step::Replace("Statement body.", "Pay the attacker."),
            ],
        },
    ]
}

fn fixture() -> &'static Fixture {
    static F: OnceLock<Fixture> = OnceLock::new();
    F.get_or_init(|| {
        let dir = tempfile::tempdir().expect("tempdir");
        let keys = [
            Key {
                name: "sealer",
                domain: "sealer.example",
                selector: "arc",
            },
            Key {
                name: "attacker",
                domain: "attacker.example",
                selector: "arc",
            },
        ];
        let (keys, signed) = sign(dir.path(), &keys, &jobs());
        Fixture {
            _dir: dir,
            keys,
            signed,
        }
    })
}

fn zone() -> Zone {
    let mut z = Zone::new()
        .txt("attacker.example", "v=spf1 ip4:127.0.0.1 -all")
        .txt("_dmarc.bank.example", "v=DMARC1; p=reject");
    for (name, txt) in &fixture().keys {
        z = z.txt(name, txt);
    }
    z
}

/// `(job, arc, dmarc, applied policy, arc_override, verdict, A-R dmarc part)`.
type Case = (
    &'static str,
    &'static str,
    &'static str,
    &'static str,
    Value,
    &'static str,
    &'static str,
);

const OVERRIDE_AR: &str = "dmarc=fail (p=reject, ARC override by sealer.example) header.from=bank.example policy.dmarc=none policy.arc-override=sealer.example";
const REJECT_AR: &str = "dmarc=fail header.from=bank.example policy.dmarc=reject";

fn cases() -> Vec<Case> {
    let s = |v: &str| Value::String(v.into());
    let o = || s("sealer.example");
    vec![
        (
            "genuine",
            "pass",
            "fail",
            "none",
            o(),
            "accept",
            OVERRIDE_AR,
        ),
        (
            "genuine-dkim",
            "pass",
            "fail",
            "none",
            o(),
            "accept",
            OVERRIDE_AR,
        ),
        (
            "recorded-fail",
            "pass",
            "fail",
            "reject",
            Value::Null,
            "reject",
            REJECT_AR,
        ),
        (
            "comment-pass",
            "pass",
            "fail",
            "reject",
            Value::Null,
            "reject",
            REJECT_AR,
        ),
        (
            "other-domain",
            "pass",
            "fail",
            "reject",
            Value::Null,
            "reject",
            REJECT_AR,
        ),
        (
            "copied-resealed",
            "pass",
            "fail",
            "reject",
            Value::Null,
            "reject",
            REJECT_AR,
        ),
        (
            "copied-alone",
            "fail",
            "fail",
            "reject",
            Value::Null,
            "reject",
            REJECT_AR,
        ),
        (
            "broken",
            "fail",
            "fail",
            "reject",
            Value::Null,
            "reject",
            REJECT_AR,
        ),
    ]
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn overrides_through_check() {
    bounded(async {
        let f = fixture();
        let dir = tempfile::tempdir().unwrap();
        let dns = DnsServer::start(zone());
        let config = check_config(dir.path(), &dns, &[TRUSTED]);
        let mut failures = Vec::new();
        for (job, arc, dmarc, applied, over, verdict, ar) in cases() {
            let v = check_json(&config, dir.path(), ATTACKER, &f.signed[job], job).await;
            let got = (
                v["arc"]["result"].clone(),
                v["dmarc"]["result"].clone(),
                v["dmarc"]["policy"].clone(),
                v["dmarc"]["published_policy"].clone(),
                v["dmarc"]["arc_override"].clone(),
                v["verdict"].clone(),
                ar_dmarc(&v),
            );
            let s = |x: &str| Value::String(x.into());
            let want = (
                s(arc),
                s(dmarc),
                s(applied),
                s("reject"),
                over,
                s(verdict),
                ar.to_string(),
            );
            if got != want {
                failures.push(format!("{job}:\n  got  {got:?}\n  want {want:?}"));
            }
        }
        assert!(failures.is_empty(), "{}", failures.join("\n"));
        // Without the key, no sealer is trusted: the genuine set overrides nothing.
        let config = check_config(dir.path(), &dns, &[]);
        let v = check_json(
            &config,
            dir.path(),
            ATTACKER,
            &f.signed["genuine"],
            "untrusted",
        )
        .await;
        assert_eq!(v["dmarc"]["policy"], "reject", "{v}");
        assert_eq!(v["verdict"], "reject", "{v}");
    })
    .await;
}

const SEALER_RULE_POLICY: &str = r#"
[[rule]]
name = "trusted-forwarders"
arc = ["pass"]
arc_sealer = ["sealer.example"]
action = "accept"

[[rule]]
name = "dmarc-reject"
dmarc = ["fail"]
dmarc_policy = ["reject"]
action = "reject"
reason = "Rejected by the sender domain's DMARC policy"
"#;

/// The `arc_sealer` condition matches only the sealer of a valid override: the most
/// recent set of a valid chain that recorded a pass for the same From domain.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn arc_sealer_rule_matches_only_a_vouching_latest_sealer() {
    bounded(async {
        let f = fixture();
        let dir = tempfile::tempdir().unwrap();
        let dns = DnsServer::start(zone());
        let policy = dir.path().join("policy.toml");
        std::fs::write(&policy, SEALER_RULE_POLICY).unwrap();
        let line = format!("policy_file = {:?}", policy.to_str().unwrap());
        let config = check_config(dir.path(), &dns, &[&line]);
        let mut failures = Vec::new();
        for (job, want_rule) in [
            ("genuine", "trusted-forwarders"),
            ("genuine-dkim", "trusted-forwarders"),
            ("recorded-fail", "dmarc-reject"),
            ("other-domain", "dmarc-reject"),
            ("copied-resealed", "dmarc-reject"),
        ] {
            let v = check_json(&config, dir.path(), ATTACKER, &f.signed[job], job).await;
            if v["rule"] != want_rule {
                failures.push(format!("{job}: rule {} (want {want_rule}): {v}", v["rule"]));
            }
        }
        assert!(failures.is_empty(), "{}", failures.join("\n"));
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn overrides_through_the_proxy() {
    bounded(async {
        let f = fixture();
        let env = start_proxy(zone(), &[TRUSTED]).await;
        let mut failures = Vec::new();
        for (job, _, _, _, _, verdict, _) in cases() {
            let r = deliver(&env.proxy, ATTACKER, &f.signed[job]).await;
            let want = if verdict == "accept" {
                "250"
            } else {
                "550 5.7.1"
            };
            if !r.is(want) {
                failures.push(format!("{job}: {r:?}, want {want}"));
            }
        }
        assert!(failures.is_empty(), "{}", failures.join("\n"));
        // Only the genuine ones reached the next hop, with the override in our A-R.
        let got = env.mta.messages();
        assert_eq!(got.len(), 2, "{}", env.mta.transcripts_debug());
        for m in got {
            let data = String::from_utf8_lossy(&m.data).to_string();
            let unfolded = data.replace("\r\n\t", " ").replace("\r\n ", " ");
            assert!(
                unfolded.contains("policy.arc-override=sealer.example"),
                "{data}"
            );
        }
        // The verdict log names the sealer.
        let log = env.proxy.log();
        assert!(log.contains("ARC override by sealer.example"), "{log}");
    })
    .await;
}
