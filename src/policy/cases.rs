//! Policy tests: cases of inputs (results, flags, domains, headers) with the action and
//! rule a policy must give them (`mailwarden policy test POLICY CASES`, and
//! `check-config` for the files a policy names in `tests = [...]`). Each case becomes a
//! [`PolicyInputs`] and goes through [`PolicyInputs::evaluate`], the proxy's own
//! decision function.

use std::net::IpAddr;
use std::path::Path;

use serde::{Deserialize, Serialize};

use super::inputs::{
    LoggedAuth, LoggedDkim, LoggedSanity, LoggedSpf, OutboundInputs, PolicyInputs,
};
use super::rules::{ActionKind, KNOWN_FLAGS, Policy};
use crate::auth::AuthResult;
use crate::config::{ConfigError, locate};

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct CasesFile {
    #[serde(rename = "case", default)]
    cases: Vec<Case>,
}

/// One DKIM signature of a case.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CaseDkim {
    pub result: AuthResult,
    pub domain: String,
}

/// One case as written in the file. Unset results are `none`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Case {
    pub name: String,
    /// `false`: verification did not run (submission without `verify_submission`).
    #[serde(default = "yes")]
    pub verified: bool,
    #[serde(default = "none")]
    pub spf: AuthResult,
    #[serde(default = "none")]
    pub spf_helo: AuthResult,
    #[serde(default)]
    pub dkim: Vec<CaseDkim>,
    #[serde(default = "none")]
    pub arc: AuthResult,
    /// The sealer that vouched for the message (see the `arc_sealer` condition).
    pub arc_sealer: Option<String>,
    #[serde(default = "none")]
    pub dmarc: AuthResult,
    /// The applied DMARC policy: none | quarantine | reject.
    pub dmarc_policy: Option<String>,
    /// The results rest on stale DNS answers (serve-stale: the `stale` condition); the
    /// case marks SPF and DMARC stale by an hour.
    #[serde(default)]
    pub stale: bool,
    #[serde(default)]
    pub flags: Vec<String>,
    #[serde(default)]
    pub from_domain: String,
    /// Default: `from_domain`.
    pub mail_from_domain: Option<String>,
    #[serde(default)]
    pub rcpt_domains: Vec<String>,
    /// The List-Id identifier (`<...>` content).
    pub list_id: Option<String>,
    #[serde(default = "documentation_ip")]
    pub client_ip: IpAddr,
    /// A header-sanity problem, and the `[auth] malformed_from` action it got.
    pub header_sanity: Option<String>,
    pub header_sanity_action: Option<ActionKind>,
    /// The outbound stage's action for a submission it let through (`none` | `alert`);
    /// absent: the outbound stage did not run (inbound mail).
    pub outbound: Option<String>,
    /// The outbound stage's flags (with `outbound`).
    #[serde(default)]
    pub outbound_flags: Vec<String>,
    /// What the policy must decide.
    pub expect: ActionKind,
    /// And by which rule (`default` when none matches), when given.
    pub rule: Option<String>,
}

fn yes() -> bool {
    true
}
fn none() -> AuthResult {
    AuthResult::None
}
fn documentation_ip() -> IpAddr {
    IpAddr::from([192, 0, 2, 1])
}

impl Case {
    pub fn inputs(&self) -> PolicyInputs {
        let mail_from_domain = self
            .mail_from_domain
            .clone()
            .unwrap_or_else(|| self.from_domain.clone());
        let auth = self.verified.then(|| LoggedAuth {
            spf: LoggedSpf {
                result: self.spf,
                domain: mail_from_domain.clone(),
            },
            spf_helo: LoggedSpf {
                result: self.spf_helo,
                domain: String::new(),
            },
            dkim: self
                .dkim
                .iter()
                .map(|d| LoggedDkim {
                    result: d.result,
                    domain: d.domain.clone(),
                    selector: String::new(),
                    stale_secs: None,
                })
                .collect(),
            arc: self.arc,
            arc_vouching_sealer: self.arc_sealer.clone(),
            dmarc: self.dmarc,
            dmarc_policy: self.dmarc_policy.clone(),
            dmarc_published_policy: self.dmarc_policy.clone(),
            dmarc_domain: self.from_domain.clone(),
            stale: if self.stale {
                crate::auth::StaleUse {
                    spf: Some(3600),
                    dmarc: Some(3600),
                    ..Default::default()
                }
            } else {
                crate::auth::StaleUse::default()
            },
        });
        PolicyInputs {
            auth,
            flags: self.flags.clone(),
            from_domain: self.from_domain.to_ascii_lowercase(),
            mail_from_domain,
            rcpt_domains: self.rcpt_domains.clone(),
            list_id: self.list_id.clone(),
            client_ip: self.client_ip,
            sanity: self.header_sanity.as_ref().map(|p| LoggedSanity {
                problem: p.clone(),
                text: format!("header sanity: {p}"),
                action: self.header_sanity_action.unwrap_or(ActionKind::Quarantine),
            }),
            outbound: self.outbound.as_ref().map(|action| OutboundInputs {
                action: action.clone(),
                flags: self.outbound_flags.clone(),
            }),
        }
    }
}

/// The outcome of one case.
#[derive(Debug, Clone, Serialize)]
pub struct CaseResult {
    pub name: String,
    /// `file:line` of the case.
    pub at: String,
    pub ok: bool,
    pub expected_action: ActionKind,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub expected_rule: Option<String>,
    pub action: ActionKind,
    pub rule: String,
    pub trace: Vec<String>,
}

/// Reads and checks a cases file; errors name the file, line and key.
pub fn load(path: &Path) -> Result<Vec<(Case, Option<usize>)>, ConfigError> {
    let err = |line, key: &str, reason: String| ConfigError {
        file: path.to_path_buf(),
        line,
        key: key.to_string(),
        reason,
    };
    let source =
        std::fs::read_to_string(path).map_err(|e| err(None, "-", format!("cannot read: {e}")))?;
    let file: CasesFile =
        toml::from_str(&source).map_err(|e| ConfigError::from_toml(path, &source, &e))?;
    if file.cases.is_empty() {
        return Err(err(None, "case", "no [[case]] in the file".into()));
    }
    let mut out = Vec::new();
    for (i, case) in file.cases.into_iter().enumerate() {
        let table = format!("case[{i}]");
        for flag in &case.flags {
            if !KNOWN_FLAGS.contains(&flag.as_str()) {
                return Err(err(
                    locate(&source, &table, "flags"),
                    &format!("{table}.flags"),
                    format!("unknown flag `{flag}` (known: {})", KNOWN_FLAGS.join(", ")),
                ));
            }
        }
        if let Some(p) = &case.dmarc_policy
            && !matches!(p.as_str(), "none" | "quarantine" | "reject")
        {
            return Err(err(
                locate(&source, &table, "dmarc_policy"),
                &format!("{table}.dmarc_policy"),
                format!("`{p}`: none, quarantine or reject"),
            ));
        }
        let line = locate(&source, &table, "name");
        out.push((case, line));
    }
    Ok(out)
}

/// Runs every case of `path` against `policy`.
pub fn run(policy: &Policy, path: &Path) -> Result<Vec<CaseResult>, ConfigError> {
    Ok(load(path)?
        .into_iter()
        .map(|(case, line)| {
            let e = case.inputs().evaluate(policy);
            let ok = e.action == case.expect && case.rule.as_ref().is_none_or(|r| *r == e.rule);
            CaseResult {
                at: format!(
                    "{}:{}",
                    path.display(),
                    line.map_or("-".to_string(), |l| l.to_string())
                ),
                name: case.name,
                ok,
                expected_action: case.expect,
                expected_rule: case.rule,
                action: e.action,
                rule: e.rule.clone(),
                trace: super::rules::compact_trace(&e.trace),
            }
        })
        .collect())
}

/// The readable diff of a failed case.
pub fn render_failure(r: &CaseResult) -> String {
    let want = match &r.expected_rule {
        Some(rule) => format!("{} by rule {rule}", r.expected_action.as_str()),
        None => r.expected_action.as_str().to_string(),
    };
    format!(
        "FAIL {} ({})\n  - expected: {want}\n  + got:      {} by rule {}\n    trace: {}\n",
        r.name,
        r.at,
        r.action.as_str(),
        r.rule,
        r.trace.join(", ")
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shipped_example_tests_pass_against_the_example_policy() {
        let root = Path::new(env!("CARGO_MANIFEST_DIR"));
        let policy = Policy::load(&root.join("config/policy.example.toml")).unwrap();
        let results = run(&policy, &root.join("config/policy.example.tests.toml")).unwrap();
        assert!(results.len() >= 8);
        let failed: Vec<String> = results
            .iter()
            .filter(|r| !r.ok)
            .map(render_failure)
            .collect();
        assert!(failed.is_empty(), "{}", failed.join("\n"));
    }

    /// A case that expects the wrong thing fails, with a diff naming both.
    #[test]
    fn a_wrong_expectation_fails_with_a_diff() {
        let dir = tempfile::tempdir().unwrap();
        let cases = dir.path().join("c.toml");
        std::fs::write(
            &cases,
            "[[case]]\nname = \"spoof\"\nfrom_domain = \"a.example\"\ndmarc = \"fail\"\ndmarc_policy = \"reject\"\nexpect = \"accept\"\n\n[[case]]\nname = \"ok\"\ndmarc = \"fail\"\ndmarc_policy = \"reject\"\nexpect = \"reject\"\nrule = \"dmarc-reject\"\n",
        )
        .unwrap();
        let r = run(&Policy::builtin(), &cases).unwrap();
        assert!(!r[0].ok && r[1].ok);
        let diff = render_failure(&r[0]);
        assert!(diff.contains("expected: accept"), "{diff}");
        assert!(
            diff.contains("got:      reject by rule dmarc-reject"),
            "{diff}"
        );
        assert!(diff.contains("c.toml:2"), "{diff}");
        std::fs::write(
            &cases,
            "[[case]]\nname = \"x\"\nflags = [\"made-up\"]\nexpect = \"tag\"\n",
        )
        .unwrap();
        let e = run(&Policy::builtin(), &cases).unwrap_err();
        assert_eq!((e.key.as_str(), e.line), ("case[0].flags", Some(3)));
    }
}
