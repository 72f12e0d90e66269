//! The operator's policy: an ordered list of rules mapping authentication results,
//! spoof flags and envelope facts to an action, with a trace of how it was reached.
//!
//! Every condition a rule names must hold for it to match. The first matching rule that
//! is not `shadow` decides; shadow rules are evaluated, logged and counted, and never act,
//! so a stricter rule can be tried on live traffic before it is enforced.

use std::collections::HashMap;
use std::net::IpAddr;
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};

use serde::{Deserialize, Serialize};

use super::inputs::OutboundInputs;
use crate::auth::{AuthReport, AuthResult};
use crate::config::{ConfigError, locate};
/// Domain matching lives with the wire format (authentication uses it too).
pub use crate::wire::domain::domain_in;

/// Flags a rule may name (spoof checks today; the burst detector adds its own).
pub const KNOWN_FLAGS: &[&str] = &["own-domain-spoof", "display-name-spoof", "lookalike-domain"];

/// What the outbound stage can hand the rules as its action (`outbound = [...]`). A
/// decisive outbound action (defer, hold, freeze, reject, or a frozen account) ends the
/// pipeline before the rules run (`crate::pipeline`), so a rule can only ever see these.
pub const OUTBOUND_ACTIONS: &[&str] = &["none", "alert"];

/// The outbound stage's flags a rule may name (`outbound_flags = [...]`): the values of
/// `crate::outbound::FLAG_BURST` and `FLAG_FROM` (a test checks they agree).
pub const OUTBOUND_FLAGS: &[&str] = &["outbound-burst", "outbound-from-mismatch"];

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Hash)]
#[serde(rename_all = "lowercase")]
pub enum ActionKind {
    Accept,
    Tag,
    Quarantine,
    Reject,
    Defer,
}

impl ActionKind {
    pub fn as_str(self) -> &'static str {
        match self {
            ActionKind::Accept => "accept",
            ActionKind::Tag => "tag",
            ActionKind::Quarantine => "quarantine",
            ActionKind::Reject => "reject",
            ActionKind::Defer => "defer",
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum DmarcPolicyName {
    None,
    Quarantine,
    Reject,
}

impl DmarcPolicyName {
    fn as_str(self) -> &'static str {
        match self {
            DmarcPolicyName::None => "none",
            DmarcPolicyName::Quarantine => "quarantine",
            DmarcPolicyName::Reject => "reject",
        }
    }
}

/// One rule as written in the policy file.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Rule {
    pub name: String,
    pub spf: Option<Vec<AuthResult>>,
    pub spf_helo: Option<Vec<AuthResult>>,
    pub dkim: Option<Vec<AuthResult>>,
    pub arc: Option<Vec<AuthResult>>,
    pub dmarc: Option<Vec<AuthResult>>,
    pub dmarc_policy: Option<Vec<DmarcPolicyName>>,
    pub flags: Option<Vec<String>>,
    pub from_domain: Option<Vec<String>>,
    pub mail_from_domain: Option<Vec<String>>,
    pub rcpt_domain: Option<Vec<String>>,
    pub arc_sealer: Option<Vec<String>>,
    pub list_id: Option<Vec<String>>,
    pub client_ip: Option<Vec<ipnet::IpNet>>,
    pub temperror: Option<bool>,
    /// Whether a result that counts rests on a stale DNS answer (serve-stale:
    /// [`AuthReport::any_stale`]).
    pub stale: Option<bool>,
    /// The outbound stage's action for this message (`none` | `alert`): submissions
    /// of a tracked account only; inbound mail never matches.
    pub outbound: Option<Vec<String>>,
    /// Flags the outbound stage raised ([`OUTBOUND_FLAGS`]).
    pub outbound_flags: Option<Vec<String>>,
    pub action: ActionKind,
    pub reason: Option<String>,
    #[serde(default)]
    pub shadow: bool,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct PolicyFile {
    /// Policy test files (`mailwarden policy test`) that `check-config` runs: paths
    /// relative to the policy file's directory.
    #[serde(default)]
    tests: Vec<std::path::PathBuf>,
    #[serde(default, rename = "rule")]
    rules: Vec<Rule>,
}

/// What the rules look at for one message.
pub struct Facts<'a> {
    /// `None`: verification did not run (a submission listener without `[auth]
    /// verify_submission`). Then only rules with an outbound condition are asked, and a
    /// condition on an authentication result never holds.
    pub report: Option<&'a AuthReport>,
    pub flags: &'a [String],
    pub from_domain: &'a str,
    pub mail_from_domain: &'a str,
    pub rcpt_domains: &'a [String],
    pub list_id: Option<&'a str>,
    pub client_ip: IpAddr,
    /// What the outbound stage found (submissions of a tracked account only).
    pub outbound: Option<&'a OutboundInputs>,
}

/// The compact trace: one `rule=action` (or `rule=shadow:action`, `rule=no`) per step,
/// as the decision log keeps it and `policy test` cases compare it.
pub fn compact_trace(trace: &[TraceEntry]) -> Vec<String> {
    trace
        .iter()
        .map(|t| match (t.matched, t.action, t.shadow) {
            (true, Some(a), true) => format!("{}=shadow:{a}", t.rule),
            (true, Some(a), false) => format!("{}={a}", t.rule),
            _ => format!("{}=no", t.rule),
        })
        .collect()
}

/// One step of the decision trace.
#[derive(Debug, Clone, Serialize)]
pub struct TraceEntry {
    pub rule: String,
    pub matched: bool,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub action: Option<&'static str>,
    #[serde(skip_serializing_if = "std::ops::Not::not")]
    pub shadow: bool,
}

/// What the rules found for one message: the rule that matched first (or `default`),
/// with the trace of every rule asked.
#[derive(Debug, Clone)]
pub struct RuleMatch {
    pub action: ActionKind,
    /// The rule that decided (`default` when none matched).
    pub rule: String,
    pub reason: Option<String>,
    pub trace: Vec<TraceEntry>,
    /// Shadow rules that matched, with the action they would have taken.
    pub shadow_hits: Vec<(String, ActionKind)>,
}

/// A loaded policy: rules in order, plus counters of shadow-rule hits.
pub struct Policy {
    rules: Vec<Rule>,
    /// Rules that are valid but unsafe (`check-config` prints them, the proxy logs them).
    pub warnings: Vec<String>,
    /// Where it came from ("built-in" or the file path) and a hash of its text.
    pub version: String,
    /// Test files named by the policy (absolute), for `check-config`.
    pub tests: Vec<std::path::PathBuf>,
    shadow_counts: HashMap<String, AtomicU64>,
}

impl Policy {
    /// The default policy: honour the sender's DMARC policy, defer on temporary DNS
    /// failures, quarantine spoofing, accept the rest. A DMARC fail under `p=reject` or
    /// `p=quarantine` decided on a stale DNS answer (serve-stale during an outage) is
    /// deferred, not rejected: the record or key may have changed while no server
    /// answered, and the sender's retry once DNS is back gets the fresh verdict. A pass
    /// on stale answers is accepted (marked stale in Authentication-Results): a spoof
    /// cannot pass against the known key and record.
    pub fn builtin() -> Policy {
        let rule = |name: &str, action: ActionKind, reason: &str| Rule {
            name: name.into(),
            spf: None,
            spf_helo: None,
            dkim: None,
            arc: None,
            dmarc: None,
            dmarc_policy: None,
            flags: None,
            from_domain: None,
            mail_from_domain: None,
            rcpt_domain: None,
            arc_sealer: None,
            list_id: None,
            client_ip: None,
            temperror: None,
            stale: None,
            outbound: None,
            outbound_flags: None,
            action,
            reason: Some(reason.into()),
            shadow: false,
        };
        let rules = vec![
            Rule {
                temperror: Some(true),
                ..rule(
                    "temperror-defer",
                    ActionKind::Defer,
                    "Sender authentication temporarily unavailable, try again later",
                )
            },
            Rule {
                dmarc: Some(vec![AuthResult::Fail]),
                dmarc_policy: Some(vec![DmarcPolicyName::Reject, DmarcPolicyName::Quarantine]),
                stale: Some(true),
                ..rule(
                    "dmarc-fail-stale-defer",
                    ActionKind::Defer,
                    "Sender authentication used stale DNS records, try again later",
                )
            },
            Rule {
                dmarc: Some(vec![AuthResult::Fail]),
                dmarc_policy: Some(vec![DmarcPolicyName::Reject]),
                ..rule(
                    "dmarc-reject",
                    ActionKind::Reject,
                    "Rejected by the sender domain's DMARC policy",
                )
            },
            Rule {
                dmarc: Some(vec![AuthResult::Fail]),
                dmarc_policy: Some(vec![DmarcPolicyName::Quarantine]),
                ..rule(
                    "dmarc-quarantine",
                    ActionKind::Quarantine,
                    "Held by the sender domain's DMARC policy",
                )
            },
            Rule {
                flags: Some(KNOWN_FLAGS.iter().map(|s| s.to_string()).collect()),
                ..rule(
                    "spoof-flags",
                    ActionKind::Quarantine,
                    "Held as a likely spoof",
                )
            },
        ];
        Policy::from_rules(rules, "built-in".into())
    }

    /// Loads and validates a policy file; errors name the file, line and key.
    pub fn load(path: &Path) -> Result<Policy, ConfigError> {
        let err = |line, key: &str, reason: String| ConfigError {
            file: path.to_path_buf(),
            line,
            key: key.to_string(),
            reason,
        };
        let source = std::fs::read_to_string(path)
            .map_err(|e| err(None, "-", format!("cannot read: {e}")))?;
        Self::parse(&source, path)
    }

    /// Parses and validates policy text; `path` names it in errors and its version, and
    /// is where its `tests` are looked for (the admin "What if" view passes a name only).
    pub fn parse(source: &str, path: &Path) -> Result<Policy, ConfigError> {
        let err = |line, key: &str, reason: String| ConfigError {
            file: path.to_path_buf(),
            line,
            key: key.to_string(),
            reason,
        };
        let source = source.to_string();
        let file: PolicyFile =
            toml::from_str(&source).map_err(|e| ConfigError::from_toml(path, &source, &e))?;
        let mut seen = std::collections::HashSet::new();
        for (i, rule) in file.rules.iter().enumerate() {
            let table = format!("rule[{i}]");
            let at = |key: &str| locate(&source, &table, key);
            if rule.name.is_empty() || rule.name == "default" || !seen.insert(rule.name.clone()) {
                return Err(err(
                    at("name"),
                    &format!("{table}.name"),
                    format!(
                        "`{}` must be non-empty, unique and not `default`",
                        rule.name
                    ),
                ));
            }
            for flag in rule.flags.iter().flatten() {
                if !KNOWN_FLAGS.contains(&flag.as_str()) {
                    return Err(err(
                        at("flags"),
                        &format!("{table}.flags"),
                        format!("unknown flag `{flag}` (known: {})", KNOWN_FLAGS.join(", ")),
                    ));
                }
            }
            let words = [
                ("outbound", &rule.outbound, OUTBOUND_ACTIONS),
                ("outbound_flags", &rule.outbound_flags, OUTBOUND_FLAGS),
            ];
            for (key, list, known) in words {
                if let Some(bad) = list.iter().flatten().find(|w| !known.contains(&w.as_str())) {
                    return Err(err(
                        at(key),
                        &format!("{table}.{key}"),
                        format!(
                            "unknown value `{bad}` (known: {}; a defer, hold, freeze or reject \
                             by the outbound stage is final and never reaches the rules)",
                            known.join(", ")
                        ),
                    ));
                }
            }
            if let Some(reason) = &rule.reason
                && (reason.len() > 200 || reason.chars().any(|c| c.is_control()))
            {
                return Err(err(
                    at("reason"),
                    &format!("{table}.reason"),
                    "must be one line of at most 200 characters".into(),
                ));
            }
        }
        let version = format!("{} ({:016x})", path.display(), fnv1a(source.as_bytes()));
        let warnings = lowering_rules(&file.rules)
            .into_iter()
            .map(|i| {
                let rule = &file.rules[i];
                let line = locate(&source, &format!("rule[{i}]"), "action")
                    .map_or(String::new(), |l| format!("{l}:"));
                format!(
                    "{}:{line} rule[{i}] `{}`: {} mail that a later rule would reject or hold, \
                     on conditions the sender writes (envelope and header fields); anyone can \
                     meet them. Add an authenticated condition: spf/dkim/dmarc = [\"pass\"], \
                     arc_sealer, list_id or client_ip",
                    path.display(),
                    rule.name,
                    if rule.action == ActionKind::Accept {
                        "accepts"
                    } else {
                        "only tags"
                    },
                )
            })
            .collect();
        let base = path.parent().unwrap_or(Path::new("."));
        let mut policy = Policy::from_rules(file.rules, version);
        policy.warnings = warnings;
        policy.tests = file.tests.iter().map(|t| base.join(t)).collect();
        Ok(policy)
    }

    fn from_rules(rules: Vec<Rule>, version: String) -> Policy {
        let shadow_counts = rules
            .iter()
            .filter(|r| r.shadow)
            .map(|r| (r.name.clone(), AtomicU64::new(0)))
            .collect();
        Policy {
            rules,
            warnings: Vec::new(),
            version,
            tests: Vec::new(),
            shadow_counts,
        }
    }

    /// Walks the rules in order; the first matching non-shadow rule decides. Without
    /// verification (`facts.report` is `None`) only the rules with an outbound condition
    /// are asked, and none matching is the `submission` answer, accept: such mail was
    /// never put to the other rules, and a policy written for inbound mail must not start
    /// judging submissions.
    pub fn evaluate(&self, facts: &Facts<'_>) -> RuleMatch {
        let mut trace = Vec::new();
        let mut shadow_hits = Vec::new();
        let verified = facts.report.is_some();
        for rule in self.rules.iter().filter(|r| verified || r.names_outbound()) {
            let matched = rule.matches(facts);
            trace.push(TraceEntry {
                rule: rule.name.clone(),
                matched,
                action: matched.then(|| rule.action.as_str()),
                shadow: rule.shadow,
            });
            if !matched {
                continue;
            }
            if rule.shadow {
                if let Some(c) = self.shadow_counts.get(&rule.name) {
                    c.fetch_add(1, Ordering::Relaxed);
                }
                shadow_hits.push((rule.name.clone(), rule.action));
                continue;
            }
            return RuleMatch {
                action: rule.action,
                rule: rule.name.clone(),
                reason: rule.reason.clone(),
                trace,
                shadow_hits,
            };
        }
        if !verified {
            return RuleMatch {
                action: ActionKind::Accept,
                rule: "submission".into(),
                reason: None,
                trace,
                shadow_hits,
            };
        }
        trace.push(TraceEntry {
            rule: "default".into(),
            matched: true,
            action: Some("accept"),
            shadow: false,
        });
        RuleMatch {
            action: ActionKind::Accept,
            rule: "default".into(),
            reason: None,
            trace,
            shadow_hits,
        }
    }

    /// The rules whose `rcpt_domain` names this recipient's domain (by index): two
    /// recipients with the same list get the same verdict from every rule.
    pub fn recipient_class(&self, rcpt: &str) -> Vec<usize> {
        let domain = rcpt.rsplit_once('@').map_or("", |(_, d)| d);
        self.rules
            .iter()
            .enumerate()
            .filter(|(_, r)| r.rcpt_domain.as_ref().is_some_and(|w| domain_in(domain, w)))
            .map(|(i, _)| i)
            .collect()
    }

    /// How often each shadow rule matched since the policy was loaded.
    pub fn shadow_counts(&self) -> Vec<(String, u64)> {
        let mut v: Vec<_> = self
            .shadow_counts
            .iter()
            .map(|(k, c)| (k.clone(), c.load(Ordering::Relaxed)))
            .collect();
        v.sort();
        v
    }
}

impl Rule {
    fn names_outbound(&self) -> bool {
        self.outbound.is_some() || self.outbound_flags.is_some()
    }

    fn matches(&self, f: &Facts<'_>) -> bool {
        let outbound_ok = self
            .outbound
            .as_ref()
            .is_none_or(|w| f.outbound.is_some_and(|o| w.contains(&o.action)))
            && self.outbound_flags.as_ref().is_none_or(|w| {
                f.outbound
                    .is_some_and(|o| o.flags.iter().any(|flag| w.contains(flag)))
            });
        match f.report {
            Some(r) => outbound_ok && self.matches_verified(f, r),
            // Unverified: every condition on a result, a header or a domain is unknown,
            // and an unknown condition does not hold.
            None => outbound_ok && !self.names_verified() && self.matches_client(f),
        }
    }

    /// Whether the rule names anything only verification (or header sanity) knows.
    fn names_verified(&self) -> bool {
        self.spf.is_some()
            || self.spf_helo.is_some()
            || self.dkim.is_some()
            || self.arc.is_some()
            || self.dmarc.is_some()
            || self.dmarc_policy.is_some()
            || self.flags.is_some()
            || self.from_domain.is_some()
            || self.mail_from_domain.is_some()
            || self.rcpt_domain.is_some()
            || self.arc_sealer.is_some()
            || self.list_id.is_some()
            || self.temperror.is_some()
            || self.stale.is_some()
    }

    fn matches_client(&self, f: &Facts<'_>) -> bool {
        self.client_ip
            .as_ref()
            .is_none_or(|w| w.iter().any(|n| n.contains(&f.client_ip.to_canonical())))
    }

    fn matches_verified(&self, f: &Facts<'_>, r: &AuthReport) -> bool {
        let result_in = |want: &Option<Vec<AuthResult>>, got: AuthResult| {
            want.as_ref().is_none_or(|w| w.contains(&got))
        };
        result_in(&self.spf, r.spf.mail_from.result)
            && result_in(&self.spf_helo, r.spf.helo.result)
            && result_in(&self.dkim, r.dkim_aggregate())
            && result_in(&self.arc, r.arc.result)
            && result_in(&self.dmarc, r.dmarc.result)
            && self
                .dmarc_policy
                .as_ref()
                .is_none_or(|w| w.iter().any(|p| Some(p.as_str()) == r.dmarc.policy))
            && self
                .flags
                .as_ref()
                .is_none_or(|w| w.iter().any(|flag| f.flags.contains(flag)))
            && self
                .from_domain
                .as_ref()
                .is_none_or(|w| domain_in(f.from_domain, w))
            && self
                .mail_from_domain
                .as_ref()
                .is_none_or(|w| domain_in(f.mail_from_domain, w))
            && self
                .rcpt_domain
                .as_ref()
                .is_none_or(|w| f.rcpt_domains.iter().any(|d| domain_in(d, w)))
            // Only the sealer whose most recent set of a valid chain vouched for this
            // From domain (crate::auth::arc): a sealer further down the chain, or one that
            // recorded a DMARC fail, is no one to trust.
            && self
                .arc_sealer
                .as_ref()
                .is_none_or(|w| r.arc.vouching_sealer.as_deref().is_some_and(|d| domain_in(d, w)))
            && self.list_id.as_ref().is_none_or(|w| {
                f.list_id
                    .is_some_and(|l| domain_in(l, w) && list_authenticated(l, r))
            })
            && self.matches_client(f)
            && self.temperror.is_none_or(|t| t == r.any_temperror())
            && self.stale.is_none_or(|t| t == r.any_stale())
    }
}

/// Indexes of rules that lower a verdict on sender-controlled facts alone: an accept or
/// tag rule (not shadow) before a reject or quarantine rule, with no condition that
/// needs authentication. Results other than `pass` (`dmarc = ["fail"]`), domains,
/// recipients, flags and `temperror` are all things a spoofer chooses.
fn lowering_rules(rules: &[Rule]) -> Vec<usize> {
    let pass_only = |r: &Option<Vec<AuthResult>>| {
        r.as_ref()
            .is_some_and(|v| !v.is_empty() && v.iter().all(|x| *x == AuthResult::Pass))
    };
    let authenticated = |r: &Rule| {
        pass_only(&r.spf)
            || pass_only(&r.spf_helo)
            || pass_only(&r.dkim)
            || pass_only(&r.arc)
            || pass_only(&r.dmarc)
            || r.arc_sealer.is_some()
            || r.list_id.is_some()
            || r.client_ip.is_some()
    };
    rules
        .iter()
        .enumerate()
        .filter(|(i, r)| {
            !r.shadow
                && matches!(r.action, ActionKind::Accept | ActionKind::Tag)
                && !authenticated(r)
                && rules[i + 1..].iter().any(|later| {
                    !later.shadow
                        && matches!(later.action, ActionKind::Reject | ActionKind::Quarantine)
                })
        })
        .map(|(i, _)| i)
        .collect()
}

/// Whether the list itself vouches for the message: a passing DKIM signature whose `d=`
/// is the List-Id's domain or a parent of it. A List-Id header is the sender's word
/// (anyone can add one to a spoof); the list's own signature is not.
fn list_authenticated(list_id: &str, report: &AuthReport) -> bool {
    report.dkim.iter().any(|d| {
        d.result == AuthResult::Pass && domain_in(list_id, std::slice::from_ref(&d.domain))
    })
}

/// A small stable hash of the policy text, to tell versions apart in logs.
fn fnv1a(bytes: &[u8]) -> u64 {
    bytes.iter().fold(0xcbf2_9ce4_8422_2325, |h, &b| {
        (h ^ u64::from(b)).wrapping_mul(0x0100_0000_01b3)
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::auth::*;

    fn report(dmarc: AuthResult, policy: Option<&'static str>) -> AuthReport {
        AuthReport {
            spf: SpfPair {
                mail_from: SpfCheck {
                    result: AuthResult::Pass,
                    domain: "a.example".into(),
                },
                helo: SpfCheck {
                    result: AuthResult::None,
                    domain: "mx.a.example".into(),
                },
            },
            dkim: vec![],
            arc: ArcCheck::none(AuthResult::None),
            dmarc: DmarcCheck {
                policy,
                published_policy: policy,
                ..DmarcCheck::without_record(dmarc, "a.example".into())
            },
            work: WorkCounts::default(),
            stale: Default::default(),
        }
    }

    fn facts<'a>(r: &'a AuthReport, flags: &'a [String], rcpts: &'a [String]) -> Facts<'a> {
        Facts {
            report: Some(r),
            flags,
            from_domain: "a.example",
            mail_from_domain: "a.example",
            rcpt_domains: rcpts,
            list_id: None,
            client_ip: "192.0.2.1".parse().unwrap(),
            outbound: None,
        }
    }

    #[test]
    fn builtin_honours_dmarc() {
        let p = Policy::builtin();
        let r = report(AuthResult::Fail, Some("reject"));
        let e = p.evaluate(&facts(&r, &[], &[]));
        assert_eq!(e.action, ActionKind::Reject);
        assert_eq!(e.rule, "dmarc-reject");
        assert_eq!(e.trace.len(), 3);
        let r = report(AuthResult::Fail, Some("none"));
        assert_eq!(p.evaluate(&facts(&r, &[], &[])).action, ActionKind::Accept);
        let r = report(AuthResult::TempError, Some("reject"));
        assert_eq!(p.evaluate(&facts(&r, &[], &[])).action, ActionKind::Defer);
        let r = report(AuthResult::Pass, None);
        let flags = vec!["lookalike-domain".to_string()];
        assert_eq!(
            p.evaluate(&facts(&r, &flags, &[])).action,
            ActionKind::Quarantine
        );
    }

    #[test]
    fn builtin_defers_a_dmarc_fail_decided_on_stale_records() {
        let p = Policy::builtin();
        let mut r = report(AuthResult::Fail, Some("reject"));
        r.stale.dmarc = Some(7200);
        let e = p.evaluate(&facts(&r, &[], &[]));
        assert_eq!(
            (e.action, e.rule.as_str()),
            (ActionKind::Defer, "dmarc-fail-stale-defer")
        );
        // A stale DKIM key under a fresh DMARC record counts too.
        let mut r = report(AuthResult::Fail, Some("quarantine"));
        r.dkim.push(DkimCheck {
            result: AuthResult::Fail,
            domain: "a.example".into(),
            selector: "s".into(),
            algorithm: "rsa-sha256".into(),
            reason: None,
            stale_secs: Some(60),
        });
        assert_eq!(p.evaluate(&facts(&r, &[], &[])).action, ActionKind::Defer);
        // A pass on stale records is accepted; a p=none fail is not held back.
        let mut r = report(AuthResult::Pass, Some("reject"));
        r.stale.dmarc = Some(7200);
        assert_eq!(p.evaluate(&facts(&r, &[], &[])).action, ActionKind::Accept);
        let mut r = report(AuthResult::Fail, Some("none"));
        r.stale.spf = Some(5);
        assert_eq!(p.evaluate(&facts(&r, &[], &[])).action, ActionKind::Accept);
        // HELO's SPF alone does not make the verdict stale: the fail still rejects.
        let mut r = report(AuthResult::Fail, Some("reject"));
        r.stale.spf_helo = Some(5);
        assert_eq!(p.evaluate(&facts(&r, &[], &[])).action, ActionKind::Reject);
    }

    #[test]
    fn file_rules_shadow_and_overrides() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("policy.toml");
        std::fs::write(
            &path,
            r#"
[[rule]]
name = "strict-trial"
dmarc = ["fail"]
action = "reject"
shadow = true

[[rule]]
name = "partner"
rcpt_domain = ["sales.example.org"]
dmarc = ["fail"]
action = "tag"
"#,
        )
        .unwrap();
        let p = Policy::load(&path).unwrap();
        let r = report(AuthResult::Fail, Some("none"));
        let rcpts = vec!["sales.example.org".to_string()];
        let e = p.evaluate(&facts(&r, &[], &rcpts));
        assert_eq!(e.action, ActionKind::Tag);
        assert_eq!(
            e.shadow_hits,
            vec![("strict-trial".to_string(), ActionKind::Reject)]
        );
        assert_eq!(p.shadow_counts(), vec![("strict-trial".to_string(), 1)]);
        let e = p.evaluate(&facts(&r, &[], &[]));
        assert_eq!(e.action, ActionKind::Accept);
        assert_eq!(e.trace.last().unwrap().rule, "default");
    }

    #[test]
    fn bad_policy_names_line_and_key() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("policy.toml");
        std::fs::write(
            &path,
            "[[rule]]\nname = \"x\"\naction = \"reject\"\nflags = [\"made-up\"]\n",
        )
        .unwrap();
        let e = Policy::load(&path).err().unwrap();
        assert_eq!(e.line, Some(4));
        assert_eq!(e.key, "rule[0].flags");
        std::fs::write(&path, "[[rule]]\nname = \"x\"\naction = \"explode\"\n").unwrap();
        let e = Policy::load(&path).err().unwrap();
        assert_eq!(e.line, Some(3), "{e}");
    }

    #[test]
    fn list_id_needs_the_lists_own_signature() {
        let path = std::env::temp_dir().join(format!("mw-list-{}.toml", std::process::id()));
        std::fs::write(
            &path,
            "[[rule]]\nname = \"lists\"\nlist_id = [\"lists.example.net\"]\ndmarc = [\"fail\"]\naction = \"tag\"\n",
        )
        .unwrap();
        let p = Policy::load(&path).unwrap();
        std::fs::remove_file(&path).unwrap();
        let mut r = report(AuthResult::Fail, Some("reject"));
        let mut f = facts(&r, &[], &[]);
        f.list_id = Some("news.lists.example.net");
        assert_eq!(p.evaluate(&f).rule, "default", "a List-Id header alone");
        for (d, result, matches) in [
            ("lists.example.net", AuthResult::Pass, true),
            ("example.net", AuthResult::Pass, true),
            ("lists.example.net", AuthResult::Fail, false),
            ("attacker.example", AuthResult::Pass, false),
            ("news.lists.example.net.evil", AuthResult::Pass, false),
        ] {
            r.dkim = vec![DkimCheck {
                result,
                domain: d.into(),
                selector: "s".into(),
                algorithm: "rsa-sha256".into(),
                reason: None,
                stale_secs: None,
            }];
            let mut f = facts(&r, &[], &[]);
            f.list_id = Some("news.lists.example.net");
            assert_eq!(p.evaluate(&f).rule == "lists", matches, "{d} {result:?}");
        }
    }

    #[test]
    fn rules_lowering_a_verdict_on_sender_fields_are_warned_about() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("policy.toml");
        std::fs::write(
            &path,
            r#"
[[rule]]
name = "partner"
rcpt_domain = ["sales.example.org"]
dmarc = ["fail"]
action = "tag"

[[rule]]
name = "friends"
from_domain = ["friend.example"]
action = "accept"

[[rule]]
name = "signed-friends"
from_domain = ["friend.example"]
dkim = ["pass"]
action = "accept"

[[rule]]
name = "trial"
from_domain = ["x.example"]
action = "accept"
shadow = true

[[rule]]
name = "dmarc-reject"
dmarc = ["fail"]
action = "reject"

[[rule]]
name = "after"
from_domain = ["late.example"]
action = "accept"
"#,
        )
        .unwrap();
        let p = Policy::load(&path).unwrap();
        assert_eq!(p.warnings.len(), 2, "{:?}", p.warnings);
        assert!(
            p.warnings[0].contains("rule[0] `partner`: only tags"),
            "{}",
            p.warnings[0]
        );
        assert!(
            p.warnings[0].contains("policy.toml:6:"),
            "{}",
            p.warnings[0]
        );
        assert!(p.warnings[1].contains("rule[1] `friends`: accepts"));
        let example = Policy::load(
            &std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("config/policy.example.toml"),
        );
        assert!(example.unwrap().warnings.is_empty());
    }

    #[test]
    fn subdomains_match() {
        assert!(domain_in("mail.Example.org.", &["example.org".into()]));
        assert!(!domain_in("badexample.org", &["example.org".into()]));
    }

    #[test]
    fn outbound_words_are_the_detector_s() {
        assert_eq!(
            OUTBOUND_FLAGS,
            [crate::outbound::FLAG_BURST, crate::outbound::FLAG_FROM]
        );
        for word in OUTBOUND_ACTIONS.iter().filter(|w| **w != "none") {
            assert!(
                [crate::outbound::OutboundAction::Alert]
                    .iter()
                    .any(|a| a.as_str() == *word),
                "{word}"
            );
        }
    }

    /// A rule naming an outbound action the rules never see is an error at load, not a
    /// rule that silently never matches.
    #[test]
    fn outbound_values_are_checked() {
        let at = Path::new("p.toml");
        for (text, key) in [
            ("outbound = [\"hold\"]", "rule[0].outbound"),
            ("outbound_flags = [\"burst\"]", "rule[0].outbound_flags"),
        ] {
            let e = Policy::parse(
                &format!("[[rule]]\nname = \"x\"\n{text}\naction = \"reject\"\n"),
                at,
            )
            .err()
            .unwrap_or_else(|| panic!("{text} accepted"));
            assert_eq!((e.key.as_str(), e.line), (key, Some(3)), "{e}");
        }
        assert!(
            Policy::parse(
                "[[rule]]\nname = \"x\"\noutbound = [\"alert\"]\naction = \"tag\"\n",
                at
            )
            .is_ok()
        );
    }

    /// Without verification only rules with an outbound condition are asked, and every
    /// other condition they name (a result, a domain, a flag) fails: an inbound policy
    /// does not start judging submissions, and a rule cannot match on what nobody checked.
    #[test]
    fn unverified_mail_meets_only_outbound_rules() {
        let p = Policy::parse(
            r#"
[[rule]]
name = "all-to-partner"
rcpt_domain = ["partner.example"]
action = "reject"

[[rule]]
name = "alert-and-dmarc-none"
outbound = ["alert"]
dmarc = ["none"]
action = "reject"

[[rule]]
name = "alert-from-office"
outbound = ["alert"]
client_ip = ["192.0.2.0/24"]
action = "quarantine"
"#,
            Path::new("p.toml"),
        )
        .unwrap();
        let rcpts = vec!["partner.example".to_string()];
        let alert = OutboundInputs {
            action: "alert".into(),
            flags: vec![],
        };
        let r = report(AuthResult::None, None);
        let mut f = facts(&r, &[], &rcpts);
        f.report = None;
        f.outbound = Some(&alert);
        let m = p.evaluate(&f);
        assert_eq!(
            (m.action, m.rule.as_str()),
            (ActionKind::Quarantine, "alert-from-office")
        );
        assert_eq!(
            m.trace.len(),
            2,
            "only the outbound rules are asked: {:?}",
            m.trace
        );
        f.client_ip = "198.51.100.1".parse().unwrap();
        let m = p.evaluate(&f);
        assert_eq!(
            (m.action, m.rule.as_str()),
            (ActionKind::Accept, "submission")
        );
        // Verified (inbound) mail has no outbound findings: the outbound rules never match.
        let m = p.evaluate(&facts(&r, &[], &rcpts));
        assert_eq!(m.rule, "all-to-partner");
        let m = p.evaluate(&facts(&r, &[], &[]));
        assert_eq!(m.rule, "default");
    }

    /// `outbound = ["none"]` is what every submission that passes the outbound stage
    /// carries: an accept rule on it before a reject rule lowers verdicts for anyone,
    /// so it is warned about like any rule on sender-controlled facts.
    #[test]
    fn an_accept_on_outbound_findings_alone_is_warned_about() {
        let p = Policy::parse(
            "[[rule]]\nname = \"quiet\"\noutbound = [\"none\"]\naction = \"accept\"\n\
             [[rule]]\nname = \"no\"\ndmarc = [\"fail\"]\naction = \"reject\"\n",
            Path::new("p.toml"),
        )
        .unwrap();
        assert_eq!(p.warnings.len(), 1, "{:?}", p.warnings);
        assert!(
            p.warnings[0].contains("`quiet`: accepts"),
            "{}",
            p.warnings[0]
        );
    }
}
