//! What the rules stage reads for one message, as owned data that can be written to the
//! decision log and read back, and the one function that turns it into a verdict.
//!
//! The proxy ([`super::engine::Enforcer::evaluate`]) and the offline commands
//! (`policy replay`, `policy test`, `quarantine release --where-policy`, the admin
//! "What if" view) all end in [`decide`]: there is one policy engine, never a second
//! one that could drift from it. [`PolicyInputs::capture`] keeps exactly the facts that
//! [`super::rules::Rule::matches`] and the sanity stage read, and
//! [`PolicyInputs::evaluate`] rebuilds them; `tests` below prove the round trip gives
//! the same answer as the live path for every result the rules can name.

use std::net::IpAddr;

use serde::{Deserialize, Serialize};

use super::rules::{ActionKind, Facts, Policy, RuleMatch, TraceEntry};
use crate::auth::{
    ArcCheck, AuthReport, AuthResult, DkimCheck, DmarcCheck, SpfCheck, SpfPair, WorkCounts,
};

/// One SPF check as the rules see it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct LoggedSpf {
    pub result: AuthResult,
    pub domain: String,
}

/// One DKIM signature as the rules see it (`list_id` reads `d=` of passing ones).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct LoggedDkim {
    pub result: AuthResult,
    pub domain: String,
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub selector: String,
    /// Serve-stale: the key's age when a stale answer was used (the `stale` condition).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub stale_secs: Option<u64>,
}

/// The authentication results the rules can read, with their domains.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct LoggedAuth {
    pub spf: LoggedSpf,
    pub spf_helo: LoggedSpf,
    #[serde(default)]
    pub dkim: Vec<LoggedDkim>,
    pub arc: AuthResult,
    /// The only ARC sealer `arc_sealer` matches (see `crate::auth::ArcCheck`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub arc_vouching_sealer: Option<String>,
    pub dmarc: AuthResult,
    /// The applied DMARC policy (`none` | `quarantine` | `reject`), what `dmarc_policy` reads.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub dmarc_policy: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub dmarc_published_policy: Option<String>,
    /// The From domain DMARC evaluated.
    #[serde(default)]
    pub dmarc_domain: String,
    /// Serve-stale: which results rest on a stale DNS answer (the `stale` condition).
    #[serde(default, skip_serializing_if = "crate::auth::StaleUse::is_empty")]
    pub stale: crate::auth::StaleUse,
}

/// A header-sanity problem and the action `[auth] malformed_from` gave it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct LoggedSanity {
    /// `crate::policy::sanity::Problem::as_str`.
    pub problem: String,
    /// The reply text (the decision's reason when sanity wins).
    pub text: String,
    pub action: ActionKind,
}

/// What the outbound stage found for a submission that it let through, as the rules
/// read it (`outbound`, `outbound_flags`) and the decision log keeps it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct OutboundInputs {
    /// `none` | `alert` ([`super::rules::OUTBOUND_ACTIONS`]).
    pub action: String,
    /// `outbound-burst`, `outbound-from-mismatch`.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub flags: Vec<String>,
}

/// The outbound stage's place in the trace: `outbound=none`, `outbound=alert`. First
/// (after header sanity): it ran before verification and the rules.
fn outbound_entry(o: &OutboundInputs) -> TraceEntry {
    TraceEntry {
        rule: "outbound".into(),
        matched: true,
        action: Some(if o.action == "alert" { "alert" } else { "none" }),
        shadow: false,
    }
}

/// Everything the rules stage reads for one message.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct PolicyInputs {
    /// `None`: verification did not run (submission without `verify_submission`), and
    /// the rules were not asked.
    pub auth: Option<LoggedAuth>,
    #[serde(default)]
    pub flags: Vec<String>,
    #[serde(default)]
    pub from_domain: String,
    #[serde(default)]
    pub mail_from_domain: String,
    #[serde(default)]
    pub rcpt_domains: Vec<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub list_id: Option<String>,
    pub client_ip: IpAddr,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sanity: Option<LoggedSanity>,
    /// What the outbound stage found (submissions of a tracked account).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub outbound: Option<OutboundInputs>,
}

/// What the rules stage read and concluded for one message (the decision log's input).
#[derive(Debug, Clone)]
pub struct Explained {
    pub inputs: PolicyInputs,
    pub rule_match: RuleMatch,
}

/// Verification did not run: the rules are not asked (a submission listener without
/// `[auth] verify_submission`).
pub fn unverified() -> RuleMatch {
    RuleMatch {
        action: ActionKind::Accept,
        rule: "submission".into(),
        reason: None,
        trace: Vec::new(),
        shadow_hits: Vec::new(),
    }
}

/// What `policy` concludes over `facts`, with header sanity: the stricter of its action
/// and the rules' wins. `None` facts: nothing to ask (no verification, no outbound
/// findings). The trace starts with the stages before the rules: `header-sanity`, then
/// `outbound`, in the pipeline's order (`crate::pipeline`).
pub fn decide(
    policy: &Policy,
    facts: Option<&Facts<'_>>,
    sanity: Option<&LoggedSanity>,
) -> RuleMatch {
    let Some(facts) = facts else {
        return unverified();
    };
    let mut evaluation = policy.evaluate(facts);
    if let Some(o) = facts.outbound {
        evaluation.trace.insert(0, outbound_entry(o));
    }
    match sanity {
        Some(s) => sanity_evaluation(s.action, &s.text, evaluation),
        None => evaluation,
    }
}

/// How strict an action is, to combine header sanity with the rules' verdict.
pub fn severity(a: ActionKind) -> u8 {
    match a {
        ActionKind::Accept => 0,
        ActionKind::Tag => 1,
        ActionKind::Quarantine => 2,
        ActionKind::Defer => 3,
        ActionKind::Reject => 4,
    }
}

/// The rules' evaluation with the header-sanity stage first in its trace; the stricter
/// of the two actions wins.
fn sanity_evaluation(action: ActionKind, text: &str, mut ev: RuleMatch) -> RuleMatch {
    let entry = TraceEntry {
        rule: "header-sanity".into(),
        matched: true,
        action: Some(action.as_str()),
        shadow: false,
    };
    ev.trace.insert(0, entry);
    if severity(action) >= severity(ev.action) {
        ev.action = action;
        ev.rule = "header-sanity".into();
        ev.reason = Some(text.to_string());
    }
    ev
}

/// The applied-policy words `DmarcCheck::policy` can hold, as the static strings it
/// stores (anything else read from a log is treated as no policy).
fn policy_word(s: Option<&str>) -> Option<&'static str> {
    match s? {
        "none" => Some("none"),
        "quarantine" => Some("quarantine"),
        "reject" => Some("reject"),
        _ => None,
    }
}

impl LoggedAuth {
    pub fn capture(r: &AuthReport) -> LoggedAuth {
        let spf = |c: &SpfCheck| LoggedSpf {
            result: c.result,
            domain: c.domain.clone(),
        };
        LoggedAuth {
            spf: spf(&r.spf.mail_from),
            spf_helo: spf(&r.spf.helo),
            dkim: r
                .dkim
                .iter()
                .map(|d| LoggedDkim {
                    result: d.result,
                    domain: d.domain.clone(),
                    selector: d.selector.clone(),
                    stale_secs: d.stale_secs,
                })
                .collect(),
            arc: r.arc.result,
            arc_vouching_sealer: r.arc.vouching_sealer.clone(),
            dmarc: r.dmarc.result,
            dmarc_policy: r.dmarc.policy.map(str::to_string),
            dmarc_published_policy: r.dmarc.published_policy.map(str::to_string),
            dmarc_domain: r.dmarc.header_from.clone(),
            stale: r.stale,
        }
    }

    /// An `AuthReport` that answers every question the rules ask exactly as the
    /// original did (results, domains, the vouching sealer, the applied policy).
    pub fn to_report(&self) -> AuthReport {
        let spf = |c: &LoggedSpf| SpfCheck {
            result: c.result,
            domain: c.domain.clone(),
        };
        let mut arc = ArcCheck::none(self.arc);
        arc.vouching_sealer = self.arc_vouching_sealer.clone();
        AuthReport {
            spf: SpfPair {
                mail_from: spf(&self.spf),
                helo: spf(&self.spf_helo),
            },
            dkim: self
                .dkim
                .iter()
                .map(|d| DkimCheck {
                    result: d.result,
                    domain: d.domain.clone(),
                    selector: d.selector.clone(),
                    algorithm: String::new(),
                    reason: None,
                    stale_secs: d.stale_secs,
                })
                .collect(),
            arc,
            dmarc: DmarcCheck {
                policy: policy_word(self.dmarc_policy.as_deref()),
                published_policy: policy_word(self.dmarc_published_policy.as_deref()),
                ..DmarcCheck::without_record(self.dmarc, self.dmarc_domain.clone())
            },
            work: WorkCounts::default(),
            stale: self.stale,
        }
    }
}

impl PolicyInputs {
    /// The owned copy of what the live path handed the rules.
    pub fn capture(
        report: Option<&AuthReport>,
        facts: Option<&Facts<'_>>,
        client_ip: IpAddr,
        sanity: Option<LoggedSanity>,
    ) -> PolicyInputs {
        PolicyInputs {
            auth: report.map(LoggedAuth::capture),
            flags: facts.map(|f| f.flags.to_vec()).unwrap_or_default(),
            from_domain: facts.map(|f| f.from_domain.to_string()).unwrap_or_default(),
            mail_from_domain: facts
                .map(|f| f.mail_from_domain.to_string())
                .unwrap_or_default(),
            rcpt_domains: facts.map(|f| f.rcpt_domains.to_vec()).unwrap_or_default(),
            list_id: facts.and_then(|f| f.list_id.map(str::to_string)),
            client_ip: facts.map_or(client_ip, |f| f.client_ip),
            sanity,
            outbound: facts.and_then(|f| f.outbound.cloned()),
        }
    }

    /// What `policy` decides for these inputs: the same [`decide`] the proxy runs.
    pub fn evaluate(&self, policy: &Policy) -> RuleMatch {
        let report = self.auth.as_ref().map(LoggedAuth::to_report);
        if report.is_none() && self.outbound.is_none() {
            return unverified();
        }
        let facts = Facts {
            report: report.as_ref(),
            flags: &self.flags,
            from_domain: &self.from_domain,
            mail_from_domain: &self.mail_from_domain,
            rcpt_domains: &self.rcpt_domains,
            list_id: self.list_id.as_deref(),
            client_ip: self.client_ip,
            outbound: self.outbound.as_ref(),
        };
        decide(policy, Some(&facts), self.sanity.as_ref())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const RESULTS: &[AuthResult] = &[
        AuthResult::Pass,
        AuthResult::Fail,
        AuthResult::None,
        AuthResult::TempError,
        AuthResult::PermError,
        AuthResult::SoftFail,
        AuthResult::Neutral,
    ];

    fn policy() -> Policy {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("p.toml");
        std::fs::write(
            &path,
            r#"
[[rule]]
name = "trial"
dmarc = ["fail"]
action = "reject"
shadow = true

[[rule]]
name = "lists"
list_id = ["lists.example.net"]
action = "tag"

[[rule]]
name = "partner-arc"
arc_sealer = ["forwarder.example"]
dmarc = ["fail"]
action = "accept"

[[rule]]
name = "helo"
spf_helo = ["fail"]
dkim = ["fail", "permerror"]
action = "quarantine"

[[rule]]
name = "net"
client_ip = ["198.51.100.0/24"]
spf = ["softfail"]
action = "tag"

[[rule]]
name = "temperror-defer"
temperror = true
action = "defer"

[[rule]]
name = "stale-defer"
dmarc = ["fail"]
stale = true
action = "defer"

[[rule]]
name = "dmarc-reject"
dmarc = ["fail"]
dmarc_policy = ["reject"]
action = "reject"

[[rule]]
name = "dmarc-quarantine"
dmarc = ["fail"]
dmarc_policy = ["quarantine"]
action = "quarantine"

[[rule]]
name = "spoof"
flags = ["lookalike-domain"]
action = "quarantine"
"#,
        )
        .unwrap();
        Policy::load(&path).unwrap()
    }

    /// Every combination of results (and the conditions around them) gives the same
    /// evaluation live and after a trip through the log's JSON.
    #[test]
    fn logged_inputs_decide_as_the_live_path() {
        let p = policy();
        let mut n = 0;
        for (i, &spf) in RESULTS.iter().enumerate() {
            for &dmarc in RESULTS {
                for &dkim in RESULTS {
                    let arc = RESULTS[(i + n) % RESULTS.len()];
                    let pol = [None, Some("none"), Some("quarantine"), Some("reject")][n % 4];
                    let report = AuthReport {
                        spf: SpfPair {
                            mail_from: SpfCheck {
                                result: spf,
                                domain: "a.example".into(),
                            },
                            helo: SpfCheck {
                                result: dkim,
                                domain: "mx.a.example".into(),
                            },
                        },
                        dkim: vec![DkimCheck {
                            result: dkim,
                            domain: ["lists.example.net", "a.example"][n % 2].into(),
                            selector: "s".into(),
                            algorithm: "rsa-sha256".into(),
                            reason: None,
                            stale_secs: n.is_multiple_of(7).then_some(60),
                        }],
                        arc: ArcCheck {
                            vouching_sealer: n
                                .is_multiple_of(3)
                                .then(|| "forwarder.example".into()),
                            ..ArcCheck::none(arc)
                        },
                        dmarc: DmarcCheck {
                            policy: pol,
                            published_policy: pol,
                            ..DmarcCheck::without_record(dmarc, "a.example".into())
                        },
                        work: WorkCounts::default(),
                        stale: crate::auth::StaleUse {
                            dmarc: (n % 4 == 1).then_some(120),
                            ..Default::default()
                        },
                    };
                    let flags: Vec<String> = if n.is_multiple_of(5) {
                        vec!["lookalike-domain".into()]
                    } else {
                        vec![]
                    };
                    let rcpts = vec!["example.org".to_string()];
                    let ip: IpAddr = if n.is_multiple_of(2) {
                        "198.51.100.7"
                    } else {
                        "192.0.2.1"
                    }
                    .parse()
                    .unwrap();
                    let facts = Facts {
                        report: Some(&report),
                        flags: &flags,
                        from_domain: "a.example",
                        mail_from_domain: "a.example",
                        rcpt_domains: &rcpts,
                        list_id: n.is_multiple_of(7).then_some("news.lists.example.net"),
                        client_ip: ip,
                        outbound: None,
                    };
                    let sanity = n.is_multiple_of(11).then(|| LoggedSanity {
                        problem: "multiple-from".into(),
                        text: "more than one From".into(),
                        action: ActionKind::Quarantine,
                    });
                    let live = decide(&p, Some(&facts), sanity.as_ref());
                    let captured = PolicyInputs::capture(Some(&report), Some(&facts), ip, sanity);
                    let json = serde_json::to_string(&captured).unwrap();
                    let back: PolicyInputs = serde_json::from_str(&json).unwrap();
                    assert_eq!(back, captured);
                    let replayed = back.evaluate(&p);
                    assert_eq!(
                        (
                            replayed.action,
                            &replayed.rule,
                            &replayed.reason,
                            replayed.trace.len()
                        ),
                        (live.action, &live.rule, &live.reason, live.trace.len()),
                        "{json}"
                    );
                    n += 1;
                }
            }
        }
        assert_eq!(n, RESULTS.len().pow(3));
    }

    #[test]
    fn unverified_inputs_are_not_asked_to_the_rules() {
        let inputs = PolicyInputs::capture(None, None, "192.0.2.1".parse().unwrap(), None);
        let e = inputs.evaluate(&Policy::builtin());
        assert_eq!(
            (e.action, e.rule.as_str()),
            (ActionKind::Accept, "submission")
        );
    }
}
