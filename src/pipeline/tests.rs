//! The stage order, over the real stages: the outbound detector on its memory backend,
//! the real rules engine (a submission listener without `verify_submission`: no DNS),
//! and a counting stand-in where only the order matters.

use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};

use smtp_proto::{MailFrom, RcptTo};

use super::*;
use crate::policy::engine::Enforcer;
use crate::policy::inputs::{LoggedSanity, OutboundInputs, PolicyInputs};
use crate::policy::rules::{ActionKind, Policy};

const ALICE: &str = "alice@example.org";

/// The rules stage as a stand-in that accepts everything and counts its calls.
#[derive(Default)]
struct CountingAccept(AtomicUsize);

impl Inspector for CountingAccept {
    fn inspect<'a>(
        &'a self,
        _ctx: &'a MessageContext<'a, '_>,
    ) -> Pin<Box<dyn std::future::Future<Output = RulesFindings> + Send + 'a>> {
        self.0.fetch_add(1, Ordering::SeqCst);
        Box::pin(async { RulesFindings::accept() })
    }
}

/// A configuration in `dir` with `extra` appended, and a policy file when given.
fn config(dir: &std::path::Path, extra: &str, policy: Option<&str>) -> Config {
    let mut text = String::from(
        "local_domains = [\"example.org\"]\n[[listener]]\naddress = \"127.0.0.1:2587\"\n\
         role = \"submission\"\n",
    );
    match policy {
        // The built-in policy.
        Some("") => text.push_str("[auth]\nenabled = true\n"),
        Some(p) => {
            std::fs::write(dir.join("policy.toml"), p).unwrap();
            text.push_str("[auth]\nenabled = true\npolicy_file = \"policy.toml\"\n");
        }
        None => {}
    }
    text.push_str("[decision_log]\nenabled = true\n");
    text.push_str(&format!(
        "[outbound]\nenabled = true\nstate_file = \"{0}/state.json\"\n\
         freeze_file = \"{0}/freezes.json\"\ncommand_dir = \"{0}/commands\"\n{extra}",
        dir.display()
    ));
    let path = dir.join("mailwarden.toml");
    std::fs::write(&path, text).unwrap();
    Config::load(&path).unwrap()
}

struct Fixture {
    config: Config,
    detector: crate::outbound::Detector,
    memory: Arc<crate::wire::memory::MessageMemory>,
    from: MailFrom<String>,
    rcpts: Vec<RcptTo<String>>,
}

impl Fixture {
    async fn new(dir: &std::path::Path, extra: &str, policy: Option<&str>) -> Fixture {
        let config = config(dir, extra, policy);
        let detector = crate::outbound::Detector::new(&config.outbound)
            .await
            .unwrap();
        Fixture {
            config,
            detector,
            memory: crate::wire::memory::MessageMemory::new(
                1 << 20,
                prometheus_client::metrics::gauge::Gauge::default(),
            ),
            from: MailFrom {
                address: ALICE.into(),
                ..Default::default()
            },
            rcpts: vec![RcptTo {
                address: "bob@partner.example".into(),
                ..Default::default()
            }],
        }
    }

    fn services<'a>(&'a self, inspector: &'a dyn Inspector) -> Services<'a> {
        Services {
            config: &self.config,
            inspector,
            outbound: Some(&self.detector),
            quarantine: None,
            signer: None,
            dmarc_reports: None,
            decision_log: None,
            memory: &self.memory,
        }
    }

    fn context(&self) -> Context<'_> {
        Context {
            session_id: "test",
            client: SocketAddr::from(([192, 0, 2, 7], 40000)),
            helo: "laptop.example.org",
            esmtp: true,
            tls: true,
            role: Role::Submission,
            login: Some(ALICE),
            mail_from: &self.from,
            rcpts: &self.rcpts,
            rcpt_refused: 0,
        }
    }
}

fn message(from: &str) -> Vec<u8> {
    format!("From: {from}\r\nTo: <bob@partner.example>\r\nSubject: hi\r\n\r\nHello.\r\n")
        .into_bytes()
}

/// A frozen account is held by the outbound stage; the rules, which would accept, are
/// never asked, and the verdict says who decided and why.
#[tokio::test]
async fn a_frozen_account_is_held_even_when_the_rules_would_accept() {
    let dir = tempfile::tempdir().unwrap();
    let f = Fixture::new(dir.path(), "", None).await;
    f.detector.freeze(ALICE, "admin", "test").await.unwrap();
    let rules = CountingAccept::default();
    let bytes = message(ALICE);
    let parsed = ParsedMessage::parse(&bytes);
    let v = judge(&f.services(&rules), &f.context(), &parsed).await;
    assert!(matches!(v.action, Action::Quarantine), "{v:?}");
    assert_eq!(
        (v.decided_by, v.rule.as_str(), v.name()),
        (DecidedBy::Outbound, "outbound", "hold")
    );
    assert!(
        v.outbound.as_ref().is_some_and(|o| o.assessment.frozen),
        "{v:?}"
    );
    assert!(!v.reasons.is_empty(), "{v:?}");
    assert_eq!(
        rules.0.load(Ordering::SeqCst),
        0,
        "the rules ran for a frozen account"
    );

    // Unfrozen, the same message goes on to the rules, which accept it.
    f.detector.unfreeze(ALICE, "admin", "test").await.unwrap();
    let v = judge(&f.services(&rules), &f.context(), &parsed).await;
    assert!(matches!(v.action, Action::Accept), "{v:?}");
    assert_eq!(v.decided_by, DecidedBy::Rules);
    assert_eq!(rules.0.load(Ordering::SeqCst), 1);
    assert_eq!(v.outbound.as_ref().map(|o| o.word()), Some("none"));
}

/// The default outbound texts: a From outside the account with `action = "reject"`.
#[tokio::test]
async fn an_outbound_reject_keeps_its_reply() {
    let dir = tempfile::tempdir().unwrap();
    let f = Fixture::new(dir.path(), "[outbound.from]\naction = \"reject\"\n", None).await;
    let rules = CountingAccept::default();
    let bytes = message("\"CEO\" <ceo@bank.example>");
    let parsed = ParsedMessage::parse(&bytes);
    let v = judge(&f.services(&rules), &f.context(), &parsed).await;
    let Action::Reject(reply) = &v.action else {
        panic!("{v:?}")
    };
    assert_eq!(
        reply.summary(),
        "550 5.7.1 From address not permitted for this account"
    );
    assert_eq!(rules.0.load(Ordering::SeqCst), 0);
}

const FROM_MISMATCH_REJECT: &str = r#"
[[rule]]
name = "no-foreign-from"
outbound_flags = ["outbound-from-mismatch"]
action = "reject"
reason = "Use your own address"
"#;

/// What the outbound stage lets through (an alert) reaches the rules as inputs, shows
/// first in the trace, and a rule naming it decides.
#[tokio::test]
async fn outbound_findings_reach_the_rules_inputs_and_trace() {
    let dir = tempfile::tempdir().unwrap();
    let f = Fixture::new(
        dir.path(),
        "[outbound.from]\naction = \"alert\"\n",
        Some(FROM_MISMATCH_REJECT),
    )
    .await;
    let enforcer = Enforcer::from_config(&f.config).unwrap();
    let bytes = message("\"CEO\" <ceo@bank.example>");
    let parsed = ParsedMessage::parse(&bytes);
    let v = judge(&f.services(&enforcer), &f.context(), &parsed).await;
    let Action::Reject(reply) = &v.action else {
        panic!("{v:?}")
    };
    assert_eq!(reply.summary(), "550 5.7.1 Use your own address");
    assert_eq!(
        (v.decided_by, v.rule.as_str()),
        (DecidedBy::Rules, "no-foreign-from")
    );
    let ex = v.explained.as_ref().expect("[decision_log] on: explained");
    assert_eq!(
        ex.inputs.outbound,
        Some(OutboundInputs {
            action: "alert".into(),
            flags: vec!["outbound-from-mismatch".into()],
        })
    );
    let trace = crate::decision_log::compact_trace(&ex.rule_match.trace);
    assert_eq!(trace, ["outbound=alert", "no-foreign-from=reject"]);

    // Her own address: no flag, the rule does not match, the submission default accepts.
    let bytes = message(ALICE);
    let parsed = ParsedMessage::parse(&bytes);
    let v = judge(&f.services(&enforcer), &f.context(), &parsed).await;
    assert!(matches!(v.action, Action::Accept), "{v:?}");
    assert_eq!(v.rule, "submission");
    let ex = v.explained.as_ref().unwrap();
    assert_eq!(
        crate::decision_log::compact_trace(&ex.rule_match.trace),
        ["outbound=none", "no-foreign-from=no"]
    );
}

/// With the built-in policy, an unverified submission the outbound stage lets through
/// is accepted as before: no inbound rule is asked about it.
#[tokio::test]
async fn the_builtin_policy_still_accepts_what_outbound_lets_through() {
    let dir = tempfile::tempdir().unwrap();
    let f = Fixture::new(
        dir.path(),
        "[outbound.from]\naction = \"alert\"\n",
        Some(""),
    )
    .await;
    let enforcer = Enforcer::from_config(&f.config).unwrap();
    let bytes = message("\"CEO\" <ceo@bank.example>");
    let parsed = ParsedMessage::parse(&bytes);
    let v = judge(&f.services(&enforcer), &f.context(), &parsed).await;
    assert!(matches!(v.action, Action::Accept), "{v:?}");
    assert_eq!(v.rule, "submission");
}

/// Limits come first: a message over the size limit is refused before the outbound
/// stage counts it or the rules see it.
#[tokio::test]
async fn limits_refuse_before_any_other_stage() {
    let dir = tempfile::tempdir().unwrap();
    let f = Fixture::new(dir.path(), "", None).await;
    let rules = CountingAccept::default();
    let stats = DataStats {
        size: 1 << 30,
        too_big: true,
        ..DataStats::default()
    };
    let (v, reply) = limits::check(&f.services(&rules), &f.context(), b"", &stats).unwrap();
    assert_eq!(reply.code, 552);
    assert_eq!(
        (v.decided_by, v.rule.as_str(), v.name()),
        (DecidedBy::Limits, "size", "refused")
    );
    assert!(v.outbound.is_none());
    let fine = DataStats::default();
    assert!(
        limits::check(
            &f.services(&rules),
            &f.context(),
            b"Subject: x\r\n\r\n",
            &fine
        )
        .is_none()
    );
}

/// Header sanity beats the rules, and the trace reads in stage order: header sanity,
/// outbound, then the rules; the same after a trip through the decision log.
#[test]
fn sanity_beats_the_rules_and_the_trace_follows_the_stages() {
    let policy = Policy::parse(
        "[[rule]]\nname = \"alerts-tagged\"\noutbound = [\"alert\"]\naction = \"tag\"\n",
        std::path::Path::new("p.toml"),
    )
    .unwrap();
    let inputs = PolicyInputs {
        sanity: Some(LoggedSanity {
            problem: "several-from-fields".into(),
            text: "two From fields".into(),
            action: ActionKind::Reject,
        }),
        outbound: Some(OutboundInputs {
            action: "alert".into(),
            flags: vec![],
        }),
        ..PolicyInputs::capture(None, None, "192.0.2.7".parse().unwrap(), None)
    };
    let m = inputs.evaluate(&policy);
    assert_eq!(
        (m.action, m.rule.as_str()),
        (ActionKind::Reject, "header-sanity")
    );
    assert_eq!(
        crate::decision_log::compact_trace(&m.trace),
        [
            "header-sanity=reject",
            "outbound=alert",
            "alerts-tagged=tag"
        ]
    );
    let back: PolicyInputs =
        serde_json::from_str(&serde_json::to_string(&inputs).unwrap()).unwrap();
    assert_eq!(back, inputs);
    // Without the sanity problem the outbound rule decides.
    let m = PolicyInputs {
        sanity: None,
        ..back
    }
    .evaluate(&policy);
    assert_eq!(
        (m.action, m.rule.as_str()),
        (ActionKind::Tag, "alerts-tagged")
    );
}
