//! One inbound DMARC evaluation, as the report needs it: identifiers, raw SPF and DKIM
//! results, the DMARC-aligned results, the published and applied policies, the
//! disposition really taken and why it differs.

use std::net::IpAddr;

use serde::{Deserialize, Serialize};

use crate::auth::{AuthReport, AuthResult};

/// The record as published (`policy_published`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Published {
    /// Where the record was found: the reporting domain.
    pub domain: String,
    pub adkim: String,
    pub aspf: String,
    pub p: String,
    pub sp: String,
    pub pct: u8,
    pub fo: String,
    /// `rua=` as published (destinations are taken from the latest evaluation).
    pub rua: String,
}

#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub struct DkimResult {
    pub domain: String,
    pub selector: String,
    pub result: String,
}

/// A `PolicyOverrideReason` (RFC 7489 Appendix C `PolicyOverrideType`).
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub struct Override {
    pub kind: String,
    pub comment: String,
}

/// One message's DMARC evaluation as an aggregate report records it (RFC 7489 Appendix C
/// `policy_evaluated`): the report's own word, not a second name for the proxy's verdict
/// (that is `crate::pipeline::Verdict`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Evaluation {
    /// Seconds since the epoch, at the end of DATA.
    pub at: u64,
    pub source_ip: IpAddr,
    pub header_from: String,
    /// The MAIL FROM domain (empty for the null sender). RFC 9990 reports it; the RFC
    /// 7489 schema has no place for it, so it is kept for `reports show` only.
    pub envelope_from: String,
    /// The first recipient's domain (`identifiers/envelope_to`).
    pub envelope_to: String,
    pub published: Published,
    pub spf_domain: String,
    /// `mfrom`, or `helo` for the null sender.
    pub spf_scope: String,
    pub spf_result: String,
    pub dkim: Vec<DkimResult>,
    pub spf_aligned: bool,
    pub dkim_aligned: bool,
    pub dmarc_result: String,
    /// The policy after pct, t=y and a trusted ARC override.
    pub applied_policy: String,
    /// none, quarantine or reject: what we did.
    pub disposition: String,
    pub overrides: Vec<Override>,
}

/// What became of the message, as far as a report can say.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Taken {
    /// Delivered to the next hop as it is.
    Delivered,
    /// Delivered marked as suspicious (tag verdict: header, subject prefix), or held in
    /// our quarantine: both are what RFC 7489 §6.3 calls quarantine.
    Quarantined,
    Rejected,
}

impl Taken {
    fn as_str(self) -> &'static str {
        match self {
            Taken::Delivered => "none",
            Taken::Quarantined => "quarantine",
            Taken::Rejected => "reject",
        }
    }
}

/// Context of the message besides the checks.
pub struct Context<'a> {
    pub at: u64,
    pub source_ip: IpAddr,
    pub mail_from: &'a str,
    pub first_rcpt: &'a str,
    /// The verdict's rule or reason, for a `local_policy` comment.
    pub local_reason: &'a str,
}

fn domain_of(address: &str) -> String {
    address
        .rsplit_once('@')
        .map_or("", |(_, d)| d)
        .trim_end_matches('.')
        .to_ascii_lowercase()
}

/// Builds the evaluation, or `None` when there is nothing to report: no DMARC record
/// applied (result none, or a temperror: the message was not judged), or no record.
pub fn evaluate(report: &AuthReport, taken: Taken, ctx: &Context<'_>) -> Option<Evaluation> {
    let d = &report.dmarc;
    if !matches!(d.result, AuthResult::Pass | AuthResult::Fail) {
        return None;
    }
    let record = d.record.as_ref()?;
    let domain = d.record_domain.clone()?;
    let p = record.p?.as_str().to_string();
    let mode = |m| match m {
        crate::auth::dmarc::Mode::Strict => "s",
        crate::auth::dmarc::Mode::Relaxed => "r",
    };
    let published = Published {
        domain,
        adkim: mode(record.adkim).into(),
        aspf: mode(record.aspf).into(),
        sp: record
            .sp
            .map_or_else(|| p.clone(), |s| s.as_str().to_string()),
        p,
        pct: record.pct,
        fo: record.fo.clone(),
        rua: record.rua.clone(),
    };
    let (spf, scope) = if report.spf.mail_from.domain.is_empty() {
        (&report.spf.helo, "helo")
    } else {
        (&report.spf.mail_from, "mfrom")
    };
    let applied = d.policy.unwrap_or("none").to_string();
    let disposition = taken.as_str().to_string();
    Some(Evaluation {
        at: ctx.at,
        source_ip: ctx.source_ip,
        header_from: d.header_from.to_ascii_lowercase(),
        envelope_from: domain_of(ctx.mail_from),
        envelope_to: domain_of(ctx.first_rcpt),
        published,
        spf_domain: spf.domain.to_ascii_lowercase(),
        spf_scope: scope.into(),
        spf_result: spf_word(spf.result).into(),
        dkim: report
            .dkim
            .iter()
            .filter(|k| !k.domain.is_empty())
            .map(|k| DkimResult {
                domain: k.domain.to_ascii_lowercase(),
                selector: k.selector.clone(),
                result: k.result.as_str().into(),
            })
            .collect(),
        spf_aligned: d.spf_aligned,
        dkim_aligned: d.dkim_aligned,
        dmarc_result: d.result.as_str().into(),
        overrides: overrides(d, &applied, &disposition, ctx.local_reason),
        applied_policy: applied,
        disposition,
    })
}

/// SPF's result words in the report schema (`policy` is not one: it is DKIM's).
fn spf_word(r: AuthResult) -> &'static str {
    match r {
        AuthResult::Policy => "neutral",
        other => other.as_str(),
    }
}

/// Why the disposition is not the published policy (RFC 7489 §7.2.1 `reason`).
fn overrides(
    d: &crate::auth::DmarcCheck,
    applied: &str,
    disposition: &str,
    local_reason: &str,
) -> Vec<Override> {
    let mut out = Vec::new();
    let push = |out: &mut Vec<Override>, kind: &str, comment: String| {
        out.push(Override {
            kind: kind.into(),
            comment,
        })
    };
    if let Some(sealer) = &d.arc_override {
        push(
            &mut out,
            "trusted_forwarder",
            format!("arc=pass, trusted sealer {sealer}"),
        );
    }
    if d.pct_sampled == Some(false) {
        push(
            &mut out,
            "sampled_out",
            format!("pct={}", d.pct.unwrap_or(100)),
        );
    }
    if d.testing {
        // RFC 9990 names it `policy_test_mode`; the RFC 7489 enumeration has no such
        // value, hence `other` with the name in the comment.
        push(&mut out, "other", "policy_test_mode (t=y)".into());
    }
    if disposition != applied {
        push(
            &mut out,
            "local_policy",
            local_reason.chars().take(200).collect(),
        );
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::auth::{ArcCheck, DkimCheck, DmarcCheck, SpfCheck, SpfPair};
    use std::sync::Arc;

    fn report(result: AuthResult, policy: &'static str) -> AuthReport {
        let record = crate::auth::dmarc::parse_record(
            "v=DMARC1; p=reject; sp=quarantine; pct=50; adkim=s; rua=mailto:r@example.com!10m",
        )
        .unwrap();
        AuthReport {
            spf: SpfPair {
                mail_from: SpfCheck {
                    result: AuthResult::Fail,
                    domain: "Bounce.Example.com".into(),
                },
                helo: SpfCheck {
                    result: AuthResult::Pass,
                    domain: "mx.example.net".into(),
                },
            },
            dkim: vec![DkimCheck {
                result: AuthResult::Pass,
                domain: "other.example".into(),
                selector: "s1".into(),
                algorithm: "rsa-sha256".into(),
                reason: None,
                stale_secs: None,
            }],
            arc: ArcCheck::none(AuthResult::None),
            dmarc: DmarcCheck {
                policy: Some(policy),
                published_policy: Some("reject"),
                pct: Some(50),
                pct_sampled: Some(false),
                record: Some(Arc::new(record)),
                record_domain: Some("example.com".into()),
                ..DmarcCheck::without_record(result, "example.com".into())
            },
            work: Default::default(),
            stale: Default::default(),
        }
    }

    fn ctx<'a>() -> Context<'a> {
        Context {
            at: 1000,
            source_ip: "192.0.2.1".parse().unwrap(),
            mail_from: "x@Bounce.Example.com",
            first_rcpt: "u@Local.Test",
            local_reason: "rule dmarc-fail",
        }
    }

    #[test]
    fn records_published_policy_raw_results_and_why_the_disposition_differs() {
        let e = evaluate(
            &report(AuthResult::Fail, "quarantine"),
            Taken::Delivered,
            &ctx(),
        )
        .unwrap();
        assert_eq!(e.published.p, "reject");
        assert_eq!(e.published.sp, "quarantine");
        assert_eq!(e.published.adkim, "s");
        assert_eq!(e.published.pct, 50);
        assert_eq!(e.published.fo, "0");
        assert_eq!(e.published.rua, "mailto:r@example.com!10m");
        assert_eq!(
            (
                e.spf_domain.as_str(),
                e.spf_scope.as_str(),
                e.spf_result.as_str()
            ),
            ("bounce.example.com", "mfrom", "fail")
        );
        assert_eq!(e.dkim[0].domain, "other.example");
        assert_eq!(e.envelope_to, "local.test");
        assert_eq!(e.disposition, "none");
        assert_eq!(e.applied_policy, "quarantine");
        let kinds: Vec<&str> = e.overrides.iter().map(|o| o.kind.as_str()).collect();
        assert_eq!(kinds, ["sampled_out", "local_policy"]);
    }

    #[test]
    fn nothing_to_report_without_a_judged_record() {
        for r in [
            AuthResult::None,
            AuthResult::TempError,
            AuthResult::PermError,
        ] {
            assert!(evaluate(&report(r, "reject"), Taken::Rejected, &ctx()).is_none());
        }
        let mut no_record = report(AuthResult::Pass, "reject");
        no_record.dmarc.record = None;
        assert!(evaluate(&no_record, Taken::Delivered, &ctx()).is_none());
    }

    #[test]
    fn null_sender_reports_the_helo_identity() {
        let mut r = report(AuthResult::Pass, "none");
        r.spf.mail_from.domain.clear();
        let e = evaluate(&r, Taken::Quarantined, &ctx()).unwrap();
        assert_eq!(
            (
                e.spf_domain.as_str(),
                e.spf_scope.as_str(),
                e.spf_result.as_str()
            ),
            ("mx.example.net", "helo", "pass")
        );
        // quarantine taken while the applied policy was none: local policy says why.
        assert_eq!(e.overrides.last().unwrap().kind, "local_policy");
    }
}
