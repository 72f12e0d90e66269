//! `mailwarden check`: one message through the proxy's own verification and policy,
//! offline. Human output by default, one JSON object with `--json`.
//!
//! Offline there is no account state to count against, so the outbound stage's
//! findings are given (`--outbound`, `--outbound-flag`, submission only) and go through
//! the pipeline's own code: a decisive finding (defer, hold, freeze, reject, a frozen
//! account) ends the check as it ends the pipeline, with rule `outbound` and its trace
//! entry; any other reaches the rules as their `outbound` inputs.

use std::net::{IpAddr, SocketAddr};
use std::path::PathBuf;
use std::process::ExitCode;

use smtp_proto::{MailFrom, RcptTo};

use crate::config::{Config, Purpose, Role};
use crate::outbound::{AccountFindings, FLAG_BURST, FLAG_FROM, OutboundAction};
use crate::pipeline::OutboundFindings;
use crate::policy::MessageContext;
use crate::policy::engine::{Enforcer, Findings};
use crate::policy::message::ParsedMessage;
use crate::policy::rules::RuleMatch;

pub struct Args {
    pub config: PathBuf,
    pub ip: String,
    pub helo: String,
    pub mail_from: String,
    pub rcpt: Vec<String>,
    pub role: String,
    pub json: bool,
    pub message: PathBuf,
    /// The outbound stage's finding: none, alert, defer, hold, freeze, reject, frozen.
    pub outbound: Option<String>,
    /// Its flags: outbound-burst, outbound-from-mismatch.
    pub outbound_flags: Vec<String>,
}

/// Exit status for input that cannot be evaluated.
const UNUSABLE: u8 = 2;

fn unusable(msg: impl std::fmt::Display) -> ExitCode {
    eprintln!("mailwarden check: {msg}");
    ExitCode::from(UNUSABLE)
}

pub fn run(args: &Args) -> ExitCode {
    let config = match Config::load_for(&args.config, Purpose::Offline) {
        Ok(c) => c,
        Err(e) => return unusable(e),
    };
    crate::telemetry::init(&config.log.level, config.log.format);
    let Ok(ip) = args.ip.parse::<IpAddr>() else {
        return unusable(format!("--ip `{}` is not an IP address", args.ip));
    };
    let role = match args.role.as_str() {
        "inbound" => Role::Inbound,
        "submission" => Role::Submission,
        other => {
            return unusable(format!(
                "--role `{other}` is neither inbound nor submission"
            ));
        }
    };
    let outbound = match given_outbound(args.outbound.as_deref(), &args.outbound_flags) {
        Ok(o) => o,
        Err(e) => return unusable(e),
    };
    if outbound.is_some() && role != Role::Submission {
        return unusable("--outbound applies to --role submission only");
    }
    let raw = match std::fs::read(&args.message) {
        Ok(b) => b,
        Err(e) => return unusable(format!("{}: {e}", args.message.display())),
    };
    let message = crate::wire::codec::canonicalize(&raw);
    let runtime = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => return unusable(format!("cannot start the runtime: {e}")),
    };
    let verdict = runtime.block_on(async {
        let enforcer = Enforcer::from_config(&config)?;
        let mail_from = MailFrom {
            address: args.mail_from.clone(),
            ..Default::default()
        };
        let rcpts: Vec<RcptTo<String>> = args
            .rcpt
            .iter()
            .map(|r| RcptTo {
                address: r.clone(),
                ..Default::default()
            })
            .collect();
        // Parsed once, as the pipeline does: the rules stage reads this.
        let parsed = ParsedMessage::parse(&message);
        let ctx = MessageContext {
            session_id: "check",
            client: SocketAddr::new(ip, 0),
            helo: &args.helo,
            role,
            tls: false,
            mail_from: &mail_from,
            rcpts: &rcpts,
            message: &parsed,
            outbound: None,
        };
        Ok::<Findings, String>(evaluate(&enforcer, ctx, outbound.as_ref()).await)
    });
    let verdict = match verdict {
        Ok(v) => v,
        Err(e) => return unusable(e),
    };
    if args.json {
        println!("{}", verdict.to_json());
    } else {
        print!("{}", human(&verdict));
    }
    ExitCode::SUCCESS
}

/// `--outbound` and `--outbound-flag` as the detector's findings.
fn given_outbound(
    word: Option<&str>,
    flags: &[String],
) -> Result<Option<OutboundFindings>, String> {
    let Some(word) = word else {
        if flags.is_empty() {
            return Ok(None);
        }
        return Err("--outbound-flag needs --outbound".into());
    };
    let flags = flags
        .iter()
        .map(|f| {
            [FLAG_BURST, FLAG_FROM]
                .into_iter()
                .find(|k| k == f)
                .ok_or_else(|| format!("--outbound-flag `{f}`: {FLAG_BURST} or {FLAG_FROM}"))
        })
        .collect::<Result<Vec<_>, _>>()?;
    let all = [
        OutboundAction::Alert,
        OutboundAction::Defer,
        OutboundAction::Hold,
        OutboundAction::Freeze,
        OutboundAction::Reject,
    ];
    let action = match word {
        "none" | "frozen" => None,
        w => Some(all.into_iter().find(|a| a.as_str() == w).ok_or_else(|| {
            format!("--outbound `{w}`: none, alert, defer, hold, freeze, reject or frozen")
        })?),
    };
    Ok(Some(OutboundFindings {
        account: "check".into(),
        assessment: AccountFindings {
            action,
            reasons: Vec::new(),
            // A freeze freezes the account with this message, as the detector reports it.
            frozen: matches!(word, "frozen" | "freeze"),
            flags,
        },
        counts: Vec::new(),
    }))
}

/// The pipeline's judgement from the outbound stage on: a decisive outbound finding
/// ends it (nothing verified), any other is the rules' `outbound` input.
async fn evaluate(
    enforcer: &Enforcer,
    mut ctx: MessageContext<'_, '_>,
    outbound: Option<&OutboundFindings>,
) -> Findings {
    if let Some(found) = outbound.filter(|o| o.decisive()) {
        return Findings {
            report: None,
            sanity: None,
            flags: Vec::new(),
            rule_match: RuleMatch {
                action: crate::pipeline::record::action_kind(&found.action()),
                rule: "outbound".into(),
                reason: Some(found.reason()),
                trace: vec![found.trace_entry()],
                shadow_hits: Vec::new(),
            },
            authentication_results: None,
            inputs: None,
        };
    }
    let inputs = outbound.map(OutboundFindings::inputs);
    ctx.outbound = inputs.as_ref();
    enforcer.evaluate(&ctx).await
}

/// The table printed without `--json`.
fn human(v: &Findings) -> String {
    let mut out = String::new();
    let mut row = |k: &str, val: String| out.push_str(&format!("{k:<16} {val}\n"));
    if let Some(r) = &v.report {
        row(
            "SPF mail from",
            format!(
                "{:<10} {}",
                r.spf.mail_from.result.as_str(),
                r.spf.mail_from.domain
            ),
        );
        row(
            "SPF helo",
            format!("{:<10} {}", r.spf.helo.result.as_str(), r.spf.helo.domain),
        );
        if r.dkim.is_empty() {
            row("DKIM", "none       (no signature)".into());
        }
        for d in &r.dkim {
            let why = d
                .reason
                .as_deref()
                .map(|w| format!(" ({w})"))
                .unwrap_or_default();
            row(
                "DKIM",
                format!(
                    "{:<10} d={} s={} {}{why}",
                    d.result.as_str(),
                    d.domain,
                    d.selector,
                    d.algorithm
                ),
            );
        }
        let mut arc = r.arc.result.as_str().to_string();
        if let Some(s) = &r.arc.latest_sealer {
            arc.push_str(&format!("       latest sealer={s}"));
        }
        if r.arc.vouching_sealer.is_some() {
            arc.push_str(&format!(", recorded a pass for {}", r.dmarc.header_from));
        }
        row("ARC", arc);
        let d = &r.dmarc;
        let mut dmarc = format!(
            "{:<10} header.from={} policy={}",
            d.result.as_str(),
            d.header_from,
            d.policy.unwrap_or("-")
        );
        if d.published_policy != d.policy {
            dmarc.push_str(&format!(
                " (published {})",
                d.published_policy.unwrap_or("-")
            ));
        }
        if let Some(s) = &d.arc_override {
            dmarc.push_str(&format!(" arc-override={s}"));
        }
        if let Some(why) = &d.reason {
            dmarc.push_str(&format!(" ({why})"));
        }
        row("DMARC", dmarc);
        row(
            "Work",
            format!(
                "{} DNS lookups ({} refused past the limit), {} ARC sets",
                r.work.dns_lookups, r.work.dns_lookups_refused, r.work.arc_sets
            ),
        );
    } else {
        row("Checks", "skipped (submission)".into());
    }
    let flags = v.flag_names();
    row(
        "Flags",
        if flags.is_empty() {
            "-".into()
        } else {
            flags.join(", ")
        },
    );
    for reason in v.reasons() {
        row("Reason", reason);
    }
    row(
        "Verdict",
        format!(
            "{} (rule {})",
            v.rule_match.action.as_str(),
            v.rule_match.rule
        ),
    );
    for t in &v.rule_match.trace {
        let what = match (t.matched, t.action, t.shadow) {
            (true, Some(a), true) => format!("matched, shadow: would {a}"),
            (true, Some(a), false) => format!("matched: {a}"),
            _ => "no match".to_string(),
        };
        row("  rule", format!("{:<24} {what}", t.rule));
    }
    if let Some(ar) = &v.authentication_results {
        out.push_str(&format!("Authentication-Results: {ar}\n"));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A submission on a configuration in `dir` with `policy` (the policy file's text).
    fn enforcer(dir: &std::path::Path, policy: &str) -> Enforcer {
        std::fs::write(dir.join("policy.toml"), policy).unwrap();
        let path = dir.join("mailwarden.toml");
        std::fs::write(
            &path,
            "local_domains = [\"example.org\"]\n[[listener]]\naddress = \"127.0.0.1:2587\"\n\
             [auth]\nenabled = true\npolicy_file = \"policy.toml\"\n",
        )
        .unwrap();
        Enforcer::from_config(&Config::load(&path).unwrap()).unwrap()
    }

    async fn check(enforcer: &Enforcer, word: &str, flags: &[&str]) -> serde_json::Value {
        let flags: Vec<String> = flags.iter().map(|f| f.to_string()).collect();
        let outbound = given_outbound(Some(word), &flags).unwrap();
        let message = b"From: <alice@example.org>\r\nSubject: x\r\n\r\nHi.\r\n";
        let parsed = ParsedMessage::parse(message);
        let mail_from = MailFrom {
            address: "alice@example.org".into(),
            ..Default::default()
        };
        let ctx = MessageContext {
            session_id: "check",
            client: "192.0.2.7:0".parse().unwrap(),
            helo: "laptop.example.org",
            role: Role::Submission,
            tls: false,
            mail_from: &mail_from,
            rcpts: &[],
            message: &parsed,
            outbound: None,
        };
        evaluate(enforcer, ctx, outbound.as_ref()).await.to_json()
    }

    /// `check` explains outbound decisions as the proxy makes them: a frozen account is
    /// held by rule `outbound` whatever the rules say, an outbound reject keeps its
    /// reply, and what the stage lets through reaches the rules.
    #[tokio::test]
    async fn check_explains_the_outbound_stage() {
        let dir = tempfile::tempdir().unwrap();
        let e = enforcer(
            dir.path(),
            "[[rule]]\nname = \"alerts-held\"\noutbound = [\"alert\"]\n\
             outbound_flags = [\"outbound-from-mismatch\"]\naction = \"quarantine\"\n",
        );
        let j = check(&e, "frozen", &[]).await;
        assert_eq!(
            (j["verdict"].as_str(), j["rule"].as_str()),
            (Some("quarantine"), Some("outbound")),
            "{j}"
        );
        assert_eq!(j["trace"][0]["action"], "frozen", "{j}");
        assert_eq!(j["reasons"][0], "Held: the account is frozen", "{j}");
        let j = check(&e, "reject", &["outbound-from-mismatch"]).await;
        assert_eq!(j["verdict"], "reject", "{j}");
        assert_eq!(
            j["reasons"][0], "550 5.7.1 From address not permitted for this account",
            "{j}"
        );
        let j = check(&e, "alert", &["outbound-from-mismatch"]).await;
        assert_eq!(
            (j["verdict"].as_str(), j["rule"].as_str()),
            (Some("quarantine"), Some("alerts-held")),
            "{j}"
        );
        assert_eq!(j["trace"][0]["rule"], "outbound", "{j}");
        assert_eq!(j["trace"][0]["action"], "alert", "{j}");
        let j = check(&e, "none", &[]).await;
        assert_eq!(
            (j["verdict"].as_str(), j["rule"].as_str()),
            (Some("accept"), Some("submission")),
            "{j}"
        );
        assert!(given_outbound(Some("held"), &[]).is_err());
        assert!(given_outbound(None, &["outbound-burst".into()]).is_err());
    }
}
