//! `mailwarden check`: one message through the proxy's own verification and policy,
//! offline. Human output by default, one JSON object with `--json`.

use std::net::{IpAddr, SocketAddr};
use std::path::PathBuf;
use std::process::ExitCode;

use smtp_proto::{MailFrom, RcptTo};

use crate::config::{Config, Purpose, Role};
use crate::policy::MessageContext;
use crate::policy::engine::{Enforcer, Findings};
use crate::policy::message::ParsedMessage;

pub struct Args {
    pub config: PathBuf,
    pub ip: String,
    pub helo: String,
    pub mail_from: String,
    pub rcpt: Vec<String>,
    pub role: String,
    pub json: bool,
    pub message: PathBuf,
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
            // Offline: no outbound stage (no account state to count against).
            outbound: None,
        };
        Ok::<Findings, String>(enforcer.evaluate(&ctx).await)
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
