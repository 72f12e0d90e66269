//! The rules stage's engine: header sanity, verification, spoof checks and the
//! operator's rules, put together for one message. The proxy (through the pipeline and
//! [`Inspector`]) and the offline `check` command both call [`Enforcer::evaluate`], so
//! they cannot disagree.

use std::path::PathBuf;
use std::pin::Pin;
use std::sync::{Arc, RwLock};

use serde_json::json;

use super::inputs::{LoggedSanity, PolicyInputs, decide};
use super::rules::{ActionKind, Facts, Policy, RuleMatch};
use super::sanity;
use super::spoof::{self, SpoofConfig, SpoofInput};
use super::{Action, Inspector, MessageContext, RulesFindings};
use crate::auth::headers::{self, Field};
use crate::auth::{AuthReport, AuthResult, Verifier, VerifyInput};
use crate::config::{Config, ConfigError, Role, SanityAction};
use crate::relay::writer::Edit;
use crate::wire::reply::Reply;

/// Everything the rules stage found about one message (what `check` prints).
pub struct Findings {
    /// `None` when verification was skipped (submission listeners by default).
    pub report: Option<AuthReport>,
    /// What header sanity found wrong, if anything.
    pub sanity: Option<sanity::Problem>,
    pub flags: Vec<(spoof::Flag, String)>,
    pub rule_match: RuleMatch,
    /// The `Authentication-Results` value on one line.
    pub authentication_results: Option<String>,
    /// What the rules read, for the decision log (when `[decision_log]` is on).
    pub inputs: Option<PolicyInputs>,
}

impl Findings {
    pub fn flag_names(&self) -> Vec<String> {
        self.flags
            .iter()
            .map(|(f, _)| f.as_str().to_string())
            .collect()
    }

    /// Why, in a few words each: flag reasons, then the deciding rule's reason.
    pub fn reasons(&self) -> Vec<String> {
        let mut out: Vec<String> = self.flags.iter().map(|(_, why)| why.clone()).collect();
        if let Some(p) = &self.sanity {
            out.insert(0, p.reply_text());
        }
        if self.rule_match.action != ActionKind::Accept
            && let Some(r) = &self.rule_match.reason
        {
            out.push(r.clone());
        }
        out
    }

    /// The `check --json` object.
    pub fn to_json(&self) -> serde_json::Value {
        let (spf, dkim, arc, dmarc) = match &self.report {
            Some(r) => (json!(r.spf), json!(r.dkim), json!(r.arc), json!(r.dmarc)),
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
            "header_sanity": self.sanity.as_ref().map_or("ok", |p| p.as_str()),
            "work": self.report.as_ref().map(|r| json!(r.work)),
            "stale": self.report.as_ref().map(|r| json!(r.stale)),
            "flags": self.flag_names(),
            "verdict": self.rule_match.action.as_str(),
            "reasons": self.reasons(),
            "rule": self.rule_match.rule,
            "trace": self.rule_match.trace,
            "shadow": self.rule_match.shadow_hits.iter().map(|(r, a)| json!({"rule": r, "action": a.as_str()})).collect::<Vec<_>>(),
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
    malformed_from: SanityAction,
    /// Keep each message's [`PolicyInputs`] for the decision log.
    capture_inputs: bool,
    last_reload: RwLock<Option<Result<String, String>>>,
}

/// `[dns] zone_files`, read (None without any).
fn local_zones(
    dns: &crate::config::DnsConfig,
) -> Result<Option<Arc<crate::auth::zones::ZoneSet>>, String> {
    if dns.zone_files.is_empty() {
        return Ok(None);
    }
    let zones = crate::auth::zones::ZoneSet::load(&dns.zone_files)
        .map_err(|e| format!("[dns] zone_files: {e}"))?;
    tracing::info!(
        files = dns.zone_files.len(),
        names = zones.names(),
        only = dns.only_zone_files,
        "DNS: local zone files answer first"
    );
    Ok(Some(Arc::new(zones)))
}

impl Enforcer {
    pub fn from_config(config: &Config) -> Result<Enforcer, String> {
        let authenticator = crate::auth::dns::authenticator(&config.dns)?;
        let dns = crate::auth::dns::DnsClient::new(&config.dns)?
            .with_zones(local_zones(&config.dns)?, config.dns.only_zone_files);
        if let Some(path) = &config.dns.stale_cache_file {
            dns.persist_every(path.clone(), config.dns.stale_cache_interval);
        }
        let policy = match config.policy_file() {
            Some(path) => warn_unsafe(Policy::load(path).map_err(|e| e.to_string())?),
            None => Policy::builtin(),
        };
        let protected = if config.spoof.protected_domains.is_empty() {
            &config.local_domains
        } else {
            &config.spoof.protected_domains
        };
        Ok(Enforcer {
            verifier: Verifier::new(authenticator, dns, &config.hostname, &config.auth),
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
            malformed_from: config.auth.malformed_from,
            capture_inputs: config.decision_log.enabled,
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
        let policy = warn_unsafe(Policy::load(path)?);
        let version = policy.version.clone();
        *self.policy.write().unwrap_or_else(|e| e.into_inner()) = Arc::new(policy);
        Ok(version)
    }

    /// Verifies and applies the rules to `ctx.message` (its header parsed once, by the
    /// pipeline or `check`).
    ///
    /// Stages, in order: header sanity (one author domain), verification, spoof flags,
    /// the rules; with a sanity problem the stricter of its action and the rules' wins.
    /// A message that fails sanity is still verified (DMARC then evaluates its first
    /// From address's domain): `check` and the log show every result, whatever the
    /// verdict, and there is one path through this function, not two.
    pub async fn evaluate(&self, ctx: &MessageContext<'_, '_>) -> Findings {
        let policy = self.policy();
        if ctx.role == Role::Submission && !self.verify_submission {
            return self.unverified(&policy, ctx);
        }
        let fields = ctx.message.fields();
        let author = ctx.message.author();
        let problem = author.as_ref().err().cloned();
        if let Some(p) = &problem {
            count_problem(p);
        }
        let mailboxes = ctx.message.from_mailboxes();
        let from_domain = ctx.message.from_domain();
        let report = self
            .verifier
            .verify(&VerifyInput {
                ip: ctx.client.ip().to_canonical(),
                helo: ctx.helo,
                mail_from: &ctx.mail_from.address,
                message: ctx.message.bytes,
                author_domain: author.as_ref().ok().map(|a| a.domain.as_str()),
            })
            .await;
        let flags = self.spoof_flags(ctx, mailboxes, &report);
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
        let list_id = list_id(fields);
        let mail_from_domain = report.spf.mail_from.domain.clone();
        let facts = Facts {
            report: Some(&report),
            flags: &flag_names,
            from_domain: &from_domain,
            mail_from_domain: &mail_from_domain,
            rcpt_domains: &rcpt_domains,
            list_id: list_id.as_deref(),
            client_ip: ctx.client.ip(),
            outbound: ctx.outbound,
        };
        let sanity = problem.as_ref().map(|p| LoggedSanity {
            problem: p.as_str().to_string(),
            text: p.reply_text(),
            action: sanity_action(self.malformed_from),
        });
        // The one decision function the offline commands share (`super::inputs`).
        let rule_match = decide(&policy, Some(&facts), sanity.as_ref());
        let inputs = self
            .capture_inputs
            .then(|| PolicyInputs::capture(Some(&report), Some(&facts), ctx.client.ip(), sanity));
        let ar = headers::authentication_results(&self.authserv_id, &report, "; ");
        Findings {
            report: Some(report),
            sanity: problem,
            flags,
            rule_match,
            authentication_results: Some(ar),
            inputs,
        }
    }

    /// A submission without `[auth] verify_submission`: no sanity, no verification, no
    /// spoof flags; the rules with an outbound condition are asked when the outbound
    /// stage ran (`super::rules::Policy::evaluate`).
    fn unverified(&self, policy: &Policy, ctx: &MessageContext<'_, '_>) -> Findings {
        let facts = ctx.outbound.map(|o| Facts {
            report: None,
            flags: &[],
            from_domain: "",
            mail_from_domain: "",
            rcpt_domains: &[],
            list_id: None,
            client_ip: ctx.client.ip(),
            outbound: Some(o),
        });
        let rule_match = decide(policy, facts.as_ref(), None);
        let inputs = self
            .capture_inputs
            .then(|| PolicyInputs::capture(None, facts.as_ref(), ctx.client.ip(), None));
        Findings {
            report: None,
            sanity: None,
            flags: Vec::new(),
            rule_match,
            authentication_results: None,
            inputs,
        }
    }

    /// The spoof flags over every From mailbox, each flag once (with its first reason).
    fn spoof_flags(
        &self,
        ctx: &MessageContext<'_, '_>,
        mailboxes: &[(String, String)],
        report: &AuthReport,
    ) -> Vec<(spoof::Flag, String)> {
        let mut flags: Vec<(spoof::Flag, String)> = Vec::new();
        for (display_name, address) in mailboxes {
            let found = spoof::check(
                &self.spoof,
                &SpoofInput {
                    from_display_name: display_name,
                    from_address: address,
                    mail_from: &ctx.mail_from.address,
                    inbound: ctx.role == Role::Inbound,
                    dmarc_pass: report.dmarc.result == AuthResult::Pass,
                },
            );
            for (flag, why) in found {
                if !flags.iter().any(|(f, _)| *f == flag) {
                    flags.push((flag, why));
                }
            }
        }
        flags.sort_by_key(|(f, _)| *f);
        flags
    }

    /// Turns the findings into what the pipeline carries out: the reply for refusals,
    /// the headers to add and the edits (forged fields out, subject prefix in) for
    /// relayed mail.
    fn carry_out(&self, verdict: &Findings, message: &[u8], fields: &[Field<'_>]) -> RulesFindings {
        let ev = &verdict.rule_match;
        let reason = ev
            .reason
            .clone()
            .unwrap_or_else(|| "Message refused by policy".into());
        let action = match ev.action {
            ActionKind::Accept => Action::Accept,
            ActionKind::Tag => Action::Tag,
            ActionKind::Quarantine => Action::Quarantine,
            ActionKind::Reject => Action::Reject(Reply::policy_reject(reason)),
            ActionKind::Defer => Action::Defer(Reply::policy_defer(reason)),
        };
        let mut edits: Vec<Edit> =
            headers::forged_ranges(fields, &self.authserv_id, &self.verdict_header)
                .into_iter()
                .map(Edit::remove)
                .collect();
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
                let prefixed = subject_prefix_edits(message, fields, &self.subject_prefix);
                if prefixed.is_empty() {
                    added.push(format!("Subject: {}", self.subject_prefix.trim_end()));
                }
                edits.extend(prefixed);
            }
        }
        edits.sort_by_key(|e| (e.range.start, e.range.end));
        RulesFindings {
            action,
            rule: ev.rule.clone(),
            headers: added,
            edits,
            reasons: verdict.reasons(),
            flags: verdict.flag_names(),
            authentication_results: verdict.authentication_results.clone(),
            // Filled by `inspect`, which owns the verdict and moves the report in.
            auth: None,
            explained: None,
        }
    }
}

/// Inserts `prefix` at the start of every Subject field's value, in the message's own
/// bytes: an 8-bit or RFC 2047 encoded subject is never decoded and rewritten (Latin-1
/// bytes used to become U+FFFD). Header sanity allows one Subject field; when tagging
/// lets a message with several through, each gets the prefix, so none can hide it.
fn subject_prefix_edits(message: &[u8], fields: &[Field<'_>], prefix: &str) -> Vec<Edit> {
    fields
        .iter()
        .filter(|f| f.name.eq_ignore_ascii_case("Subject"))
        .filter_map(|f| {
            let raw = message.get(f.range.clone())?;
            let colon = raw.iter().position(|&b| b == b':')?;
            // After the colon and one space, if there is one.
            let mut at = colon + 1;
            if raw.get(at) == Some(&b' ') {
                at += 1;
            }
            let mut bytes = prefix.as_bytes().to_vec();
            // An encoded-word must stand apart from other text (RFC 2047 §5).
            if raw[at..].starts_with(b"=?") && !prefix.ends_with([' ', '\t']) {
                bytes.push(b' ');
            }
            Some(Edit::insert(f.range.start + at, bytes))
        })
        .collect()
}

/// Logs the policy's unsafe rules (the same lines `check-config` prints).
fn warn_unsafe(policy: Policy) -> Policy {
    for w in &policy.warnings {
        tracing::warn!(warning = %w, "policy rule lowers a verdict on unauthenticated fields");
    }
    policy
}

/// The List-Id identifier (RFC 2919: the part in angle brackets), when the message has
/// exactly one List-Id field: with two, a sender could show one and match on the other.
fn list_id(fields: &[Field<'_>]) -> Option<String> {
    let mut ids = fields
        .iter()
        .filter(|f| f.name.eq_ignore_ascii_case("List-Id"));
    let (Some(f), None) = (ids.next(), ids.next()) else {
        return None;
    };
    let v = &*f.value;
    let inner = v
        .rsplit_once('<')
        .and_then(|(_, r)| r.split_once('>'))
        .map_or(v, |(i, _)| i);
    Some(inner.trim().to_ascii_lowercase()).filter(|s| !s.is_empty())
}

fn sanity_action(a: SanityAction) -> ActionKind {
    match a {
        SanityAction::Tag => ActionKind::Tag,
        SanityAction::Quarantine => ActionKind::Quarantine,
        SanityAction::Reject => ActionKind::Reject,
        SanityAction::Defer => ActionKind::Defer,
    }
}

fn count_problem(p: &sanity::Problem) {
    crate::metrics::global()
        .header_problems
        .get_or_create(&crate::metrics::label("problem", p.as_str()))
        .inc();
}

/// Counts one rules-stage result in the metrics.
fn count(verdict: &Findings, took: std::time::Duration) {
    let m = crate::metrics::global();
    let ev = &verdict.rule_match;
    m.verdicts
        .get_or_create(&vec![
            ("action", ev.action.as_str().into()),
            ("rule", ev.rule.clone().into()),
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
    let stale = [
        ("spf", r.stale.spf.is_some()),
        ("dkim", r.dkim.iter().any(|d| d.stale_secs.is_some())),
        ("arc", r.stale.arc.is_some()),
        ("dmarc", r.stale.dmarc.is_some()),
    ];
    for (record, _) in stale.iter().filter(|(_, used)| *used) {
        m.dns
            .stale_answers
            .get_or_create(&crate::metrics::label("record", *record))
            .inc();
    }
    let mut results = vec![
        ("spf", r.spf.mail_from.result),
        ("arc", r.arc.result),
        ("dmarc", r.dmarc.result),
    ];
    results.push(("dkim", r.dkim_aggregate()));
    for (check, result) in results {
        m.auth_results
            .get_or_create(&vec![
                ("check", check.into()),
                ("result", result.as_str().into()),
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
fn trace_line(ev: &RuleMatch) -> String {
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
        ctx: &'a MessageContext<'a, '_>,
    ) -> Pin<Box<dyn Future<Output = RulesFindings> + Send + 'a>> {
        Box::pin(async move {
            let started = std::time::Instant::now();
            let verdict = self.evaluate(ctx).await;
            count(&verdict, started.elapsed());
            let ev = &verdict.rule_match;
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
            let mut found = self.carry_out(&verdict, ctx.message.bytes, ctx.message.fields());
            // Moved, not cloned: DMARC aggregate reports read it after the relay.
            found.auth = verdict.report.map(std::sync::Arc::new);
            found.explained = verdict.inputs.map(|inputs| {
                Box::new(super::inputs::Explained {
                    inputs,
                    rule_match: verdict.rule_match,
                })
            });
            found
        })
    }

    fn recipient_class(&self, role: Role, rcpt: &str) -> Vec<usize> {
        if role == Role::Submission && !self.verify_submission {
            return Vec::new();
        }
        self.policy().recipient_class(rcpt)
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
            (spf.result == AuthResult::Fail).then(|| Reply::spf_failed(&spf.domain))
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
