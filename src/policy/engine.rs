//! The verdict engine: verification, spoof checks and the operator's rules, put
//! together for one message. The proxy (through [`Inspector`]) and the offline `check`
//! command both call [`Enforcer::evaluate`], so they cannot disagree.

use std::path::PathBuf;
use std::pin::Pin;
use std::sync::{Arc, RwLock};

use serde_json::json;

use super::rules::{ActionKind, Evaluation, Facts, Policy};
use super::spoof::{self, SpoofConfig, SpoofInput};
use super::{Action, Decision, Inspector, MessageContext};
use crate::auth::headers::{self, Field};
use crate::auth::{AuthReport, AuthResult, Verifier, VerifyInput};
use crate::config::{Config, ConfigError, Role};
use crate::smtp::reply::{Enhanced, Reply};

/// Everything decided about one message.
pub struct Verdict {
    /// `None` when verification was skipped (submission listeners by default).
    pub report: Option<AuthReport>,
    pub flags: Vec<(spoof::Flag, String)>,
    pub evaluation: Evaluation,
    /// The `Authentication-Results` value on one line.
    pub authentication_results: Option<String>,
}

impl Verdict {
    pub fn flag_names(&self) -> Vec<String> {
        self.flags
            .iter()
            .map(|(f, _)| f.as_str().to_string())
            .collect()
    }

    /// Why, in a few words each: flag reasons, then the deciding rule's reason.
    pub fn reasons(&self) -> Vec<String> {
        let mut out: Vec<String> = self.flags.iter().map(|(_, why)| why.clone()).collect();
        if self.evaluation.action != ActionKind::Accept
            && let Some(r) = &self.evaluation.reason
        {
            out.push(r.clone());
        }
        out
    }

    /// The `check --json` object.
    pub fn to_json(&self) -> serde_json::Value {
        let (spf, dkim, arc, dmarc) = match &self.report {
            Some(r) => (
                json!(r.spf),
                json!(r.dkim),
                json!({"result": r.arc.result}),
                json!(r.dmarc),
            ),
            None => (
                json!(null),
                json!([]),
                json!({"result": "none"}),
                json!(null),
            ),
        };
        json!({
            "spf": spf,
            "dkim": dkim,
            "arc": arc,
            "dmarc": dmarc,
            "work": self.report.as_ref().map(|r| json!(r.work)),
            "flags": self.flag_names(),
            "verdict": self.evaluation.action.as_str(),
            "reasons": self.reasons(),
            "rule": self.evaluation.rule,
            "trace": self.evaluation.trace,
            "shadow": self.evaluation.shadow_hits.iter().map(|(r, a)| json!({"rule": r, "action": a.as_str()})).collect::<Vec<_>>(),
            "authentication_results": self.authentication_results,
        })
    }
}

pub struct Enforcer {
    verifier: Verifier,
    spoof: SpoofConfig,
    policy: RwLock<Arc<Policy>>,
    policy_path: Option<PathBuf>,
    authserv_id: String,
    verdict_header: String,
    subject_prefix: String,
    verify_submission: bool,
    spf_early_reject: bool,
    last_reload: RwLock<Option<Result<String, String>>>,
}

impl Enforcer {
    pub fn from_config(config: &Config) -> Result<Enforcer, String> {
        let authenticator = crate::auth::dns::authenticator(&config.dns)?;
        let policy = match config.policy_file() {
            Some(path) => Policy::load(path).map_err(|e| e.to_string())?,
            None => Policy::builtin(),
        };
        let protected = if config.spoof.protected_domains.is_empty() {
            &config.local_domains
        } else {
            &config.spoof.protected_domains
        };
        Ok(Enforcer {
            verifier: Verifier::new(authenticator, &config.hostname, &config.auth),
            spoof: SpoofConfig::new(
                protected,
                &config.spoof.protected_names,
                config.spoof.lookalike_distance,
            ),
            policy: RwLock::new(Arc::new(policy)),
            policy_path: config.policy_file().map(|p| p.to_path_buf()),
            authserv_id: config.authserv_id().to_string(),
            verdict_header: config.auth.verdict_header.clone(),
            subject_prefix: config.auth.subject_prefix.clone(),
            verify_submission: config.auth.verify_submission,
            spf_early_reject: config.auth.spf_early_reject,
            last_reload: RwLock::new(None),
        })
    }

    pub fn policy(&self) -> Arc<Policy> {
        self.policy
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    /// Re-reads the policy file. On error the running policy stays.
    pub fn reload_policy(&self) -> Result<String, ConfigError> {
        let Some(path) = &self.policy_path else {
            return Ok("built-in".into());
        };
        let policy = Policy::load(path)?;
        let version = policy.version.clone();
        *self.policy.write().unwrap_or_else(|e| e.into_inner()) = Arc::new(policy);
        Ok(version)
    }

    /// Verifies and decides. `fields` are the message's header fields.
    pub async fn evaluate(&self, ctx: &MessageContext<'_>, fields: &[Field<'_>]) -> Verdict {
        let policy = self.policy();
        if ctx.role == Role::Submission && !self.verify_submission {
            let evaluation = Evaluation {
                action: ActionKind::Accept,
                rule: "submission".into(),
                reason: None,
                trace: Vec::new(),
                shadow_hits: Vec::new(),
            };
            return Verdict {
                report: None,
                flags: Vec::new(),
                evaluation,
                authentication_results: None,
            };
        }
        let report = self
            .verifier
            .verify(&VerifyInput {
                ip: ctx.client.ip().to_canonical(),
                helo: ctx.helo,
                mail_from: &ctx.mail_from.address,
                message: ctx.message,
            })
            .await;
        let (display_name, from_address) = headers::first(fields, "From")
            .map(|f| spoof::parse_from_header(&f.value))
            .unwrap_or_default();
        let flags = spoof::check(
            &self.spoof,
            &SpoofInput {
                from_display_name: &display_name,
                from_address: &from_address,
                mail_from: &ctx.mail_from.address,
                inbound: ctx.role == Role::Inbound,
                dmarc_pass: report.dmarc.result == AuthResult::Pass,
            },
        );
        let flag_names: Vec<String> = flags.iter().map(|(f, _)| f.as_str().to_string()).collect();
        let rcpt_domains: Vec<String> = ctx
            .rcpts
            .iter()
            .filter_map(|r| {
                r.address
                    .rsplit_once('@')
                    .map(|(_, d)| d.to_ascii_lowercase())
            })
            .collect();
        let list_id = headers::first(fields, "List-Id").and_then(|f| {
            let v = f.value.as_str();
            let inner = v
                .rsplit_once('<')
                .and_then(|(_, r)| r.split_once('>'))
                .map_or(v, |(i, _)| i);
            Some(inner.trim().to_string()).filter(|s| !s.is_empty())
        });
        let from_domain = from_address
            .rsplit_once('@')
            .map(|(_, d)| d.to_ascii_lowercase())
            .unwrap_or_default();
        let mail_from_domain = report.spf.mail_from.domain.clone();
        let evaluation = policy.evaluate(&Facts {
            report: &report,
            flags: &flag_names,
            from_domain: &from_domain,
            mail_from_domain: &mail_from_domain,
            rcpt_domains: &rcpt_domains,
            list_id: list_id.as_deref(),
            client_ip: ctx.client.ip(),
        });
        let ar = headers::authentication_results(&self.authserv_id, &report, "; ");
        Verdict {
            report: Some(report),
            flags,
            evaluation,
            authentication_results: Some(ar),
        }
    }

    /// Turns a verdict into what the session does: the reply for refusals, the headers
    /// to add and the ranges to strip for relayed mail.
    fn decision(&self, verdict: &Verdict, fields: &[Field<'_>]) -> Decision {
        let ev = &verdict.evaluation;
        let reason = ev
            .reason
            .clone()
            .unwrap_or_else(|| "Message refused by policy".into());
        let action = match ev.action {
            ActionKind::Accept => Action::Accept,
            ActionKind::Tag => Action::Tag,
            ActionKind::Quarantine => Action::Quarantine,
            ActionKind::Reject => Action::Reject(Reply::new(550, Enhanced(5, 7, 1), reason)),
            ActionKind::Defer => Action::Defer(Reply::new(451, Enhanced(4, 7, 1), reason)),
        };
        let mut strip = headers::forged_ranges(fields, &self.authserv_id, &self.verdict_header);
        let mut added = Vec::new();
        if let Some(report) = &verdict.report {
            added.push(format!(
                "Authentication-Results: {}",
                headers::authentication_results(&self.authserv_id, report, ";\r\n\t")
            ));
        }
        if ev.action == ActionKind::Tag {
            let flags = verdict.flag_names();
            // Reasons are our own texts and flag descriptions; keep them to one
            // header-safe line (no `;`, which separates the fields).
            let reasons: Vec<String> = verdict
                .reasons()
                .iter()
                .map(|r| {
                    r.chars()
                        .map(|c| {
                            if c.is_ascii_graphic() && c != ';' {
                                c
                            } else {
                                ' '
                            }
                        })
                        .collect()
                })
                .collect();
            added.push(format!(
                "{}: tag; rule={}; flags={}; reasons={}",
                self.verdict_header,
                ev.rule
                    .replace(|c: char| !c.is_ascii_graphic() || c == ';', "_"),
                if flags.is_empty() {
                    "none".to_string()
                } else {
                    flags.join(",")
                },
                if reasons.is_empty() {
                    "none".to_string()
                } else {
                    reasons.join(", ")
                }
            ));
            if !self.subject_prefix.is_empty() {
                let subject = headers::first(fields, "Subject");
                if let Some(s) = subject {
                    strip.push(s.range.clone());
                }
                let old = subject.map(|s| s.value.as_str()).unwrap_or("");
                added.push(format!("Subject: {}{}", self.subject_prefix, old));
            }
        }
        strip.sort_by_key(|r| r.start);
        Decision {
            action,
            headers: added,
            strip,
            reasons: verdict.reasons(),
            flags: verdict.flag_names(),
            authentication_results: verdict.authentication_results.clone(),
        }
    }
}

/// Counts one verdict in the metrics.
fn count(verdict: &Verdict, took: std::time::Duration) {
    let m = crate::metrics::global();
    let ev = &verdict.evaluation;
    m.verdicts
        .get_or_create(&vec![
            ("action", ev.action.as_str().to_string()),
            ("rule", ev.rule.clone()),
        ])
        .inc();
    for (rule, _) in &ev.shadow_hits {
        m.shadow_hits
            .get_or_create(&crate::metrics::label("rule", rule.clone()))
            .inc();
    }
    for flag in verdict.flag_names() {
        m.flags
            .get_or_create(&crate::metrics::label("flag", flag))
            .inc();
    }
    let Some(r) = &verdict.report else { return };
    m.verify_seconds.observe(took.as_secs_f64());
    let mut results = vec![
        ("spf", r.spf.mail_from.result),
        ("arc", r.arc.result),
        ("dmarc", r.dmarc.result),
    ];
    results.push(("dkim", r.dkim_aggregate()));
    for (check, result) in results {
        m.auth_results
            .get_or_create(&vec![
                ("check", check.to_string()),
                ("result", result.as_str().to_string()),
            ])
            .inc();
        if result == AuthResult::TempError {
            m.dns_temperrors
                .get_or_create(&crate::metrics::label("check", check))
                .inc();
        }
    }
}

/// A compact one-line form of the decision trace for logs: `rule=matched:action,...`.
fn trace_line(ev: &Evaluation) -> String {
    ev.trace
        .iter()
        .map(|t| match (t.matched, t.action, t.shadow) {
            (true, Some(a), true) => format!("{}=shadow:{a}", t.rule),
            (true, Some(a), false) => format!("{}={a}", t.rule),
            _ => format!("{}=no", t.rule),
        })
        .collect::<Vec<_>>()
        .join(",")
}

impl Inspector for Enforcer {
    fn inspect<'a>(
        &'a self,
        ctx: &'a MessageContext<'a>,
    ) -> Pin<Box<dyn Future<Output = Decision> + Send + 'a>> {
        Box::pin(async move {
            let fields = headers::fields(ctx.message);
            let started = std::time::Instant::now();
            let verdict = self.evaluate(ctx, &fields).await;
            count(&verdict, started.elapsed());
            let ev = &verdict.evaluation;
            for (rule, action) in &ev.shadow_hits {
                tracing::info!(session = %ctx.session_id, rule = %rule, would = action.as_str(), "shadow rule matched");
            }
            tracing::info!(
                session = %ctx.session_id,
                verdict = ev.action.as_str(),
                rule = %ev.rule,
                flags = %verdict.flag_names().join(","),
                trace = %trace_line(ev),
                dns_lookups = verdict.report.as_ref().map_or(0, |r| r.work.dns_lookups),
                dns_lookups_refused = verdict.report.as_ref().map_or(0, |r| r.work.dns_lookups_refused),
                arc_sets = verdict.report.as_ref().map_or(0, |r| r.work.arc_sets),
                auth = %verdict.authentication_results.as_deref().unwrap_or("-"),
                "verdict"
            );
            self.decision(&verdict, &fields)
        })
    }

    fn policy_status(&self) -> super::PolicyStatus {
        super::PolicyStatus {
            version: self.policy().version.clone(),
            last_reload: self
                .last_reload
                .read()
                .unwrap_or_else(|e| e.into_inner())
                .clone(),
        }
    }

    fn check_mail_from<'a>(
        &'a self,
        client: std::net::SocketAddr,
        helo: &'a str,
        mail_from: &'a str,
    ) -> Pin<Box<dyn Future<Output = Option<Reply>> + Send + 'a>> {
        Box::pin(async move {
            if !self.spf_early_reject || mail_from.is_empty() {
                return None;
            }
            let spf = self
                .verifier
                .spf_mail_from(client.ip().to_canonical(), helo, mail_from)
                .await;
            (spf.result == AuthResult::Fail).then(|| {
                Reply::new(
                    550,
                    Enhanced(5, 7, 23),
                    format!(
                        "SPF check failed for {}",
                        spf.domain.replace(|c: char| !c.is_ascii_graphic(), "")
                    ),
                )
            })
        })
    }

    fn reload(&self) -> Result<String, String> {
        let result = self.reload_policy().map_err(|e| e.to_string());
        let word = if result.is_ok() { "ok" } else { "error" };
        *self.last_reload.write().unwrap_or_else(|e| e.into_inner()) = Some(result.clone());
        crate::metrics::global()
            .policy_reloads
            .get_or_create(&crate::metrics::label("result", word))
            .inc();
        result
    }
}
