//! The one decision pipeline at the end of DATA. The session reads the message and
//! hands it here; what comes back is one [`Verdict`] and the reply the client gets.
//!
//! The stages, in order, each reading the one [`ParsedMessage`] (its header parsed
//! once) and adding to the one verdict:
//!
//! 1. **limits** ([`limits`]): size, the message memory budget, bare LF, mail loops. A
//!    refusal here ends the pipeline before the header is even parsed;
//! 2. **outbound accounting** ([`outbound`], submission listeners with `[outbound]`): the
//!    message is counted for its account and client. A defer, hold, freeze, reject, or a
//!    frozen account is final: the pipeline stops (no DNS, no rule work for a burst, and
//!    no policy file can lower a hold on an account that is itself the suspect). What
//!    it finds about a message it lets through (`none` or `alert`, its flags) goes on
//!    to the rules as inputs (`outbound`, `outbound_flags`) and into the trace;
//! 3. **header sanity, sender authentication, spoof flags, policy rules**: the rules
//!    stage behind [`Inspector`] (`crate::policy::engine::Enforcer`, or `AcceptAll` with
//!    checks off), which `mailwarden check` and the admin "What if" replay run too;
//! 4. **the action** ([`action`]): relay (with outbound DKIM signing), hold in
//!    quarantine, defer or reject; then what was decided goes to the decision log and
//!    the DMARC aggregate reports ([`record`]).
//!
//! This module sits below the session (`crate::smtp`): it never imports it.

pub mod action;
pub mod limits;
pub mod outbound;
pub mod record;

use std::net::SocketAddr;
use std::sync::Arc;

use smtp_proto::{MailFrom, RcptTo};

use crate::auth::AuthReport;
use crate::config::{Config, Role};
use crate::policy::inputs::Explained;
use crate::policy::{Action, Inspector, MessageContext, RulesFindings};
use crate::relay::Relay;
use crate::relay::writer::Edit;
use crate::wire::codec::DataStats;
use crate::wire::reply::Reply;

pub use crate::policy::message::ParsedMessage;
pub use outbound::OutboundFindings;

/// What the stages use, borrowed from the session's shared state for one message.
pub struct Services<'a> {
    pub config: &'a Config,
    pub inspector: &'a dyn Inspector,
    pub outbound: Option<&'a crate::outbound::Detector>,
    pub quarantine: Option<&'a Arc<dyn crate::quarantine::QuarantineStore>>,
    pub signer: Option<&'a crate::signing::Signer>,
    pub dmarc_reports: Option<&'a crate::dmarc_reports::Recorder>,
    pub decision_log: Option<&'a crate::decision_log::DecisionLog>,
    pub memory: &'a crate::wire::memory::MessageMemory,
}

/// The session and envelope facts of one transaction.
pub struct Context<'a> {
    pub session_id: &'a str,
    pub client: SocketAddr,
    pub helo: &'a str,
    /// EHLO (not HELO): the `Received:` protocol word.
    pub esmtp: bool,
    pub tls: bool,
    pub role: Role,
    /// The SASL login (submission listeners).
    pub login: Option<&'a str>,
    pub mail_from: &'a MailFrom<String>,
    pub rcpts: &'a [RcptTo<String>],
    /// Recipients the next hop refused (an outbound signal).
    pub rcpt_refused: usize,
}

/// Which stage decided.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DecidedBy {
    Limits,
    Outbound,
    /// Header sanity, verification, spoof flags and the policy rules.
    Rules,
}

/// What was decided about one message, by all the stages together.
#[derive(Debug)]
pub struct Verdict {
    pub action: Action,
    pub decided_by: DecidedBy,
    /// The deciding rule: a policy rule, `default`, `submission`, `header-sanity`,
    /// `outbound`, or the limit (`size`, `memory`, `bare-lf`, `loop`).
    pub rule: String,
    /// Header lines (without CRLF) to add at the top of the relayed message.
    pub headers: Vec<String>,
    /// Changes to the message when relaying, sorted.
    pub edits: Vec<Edit>,
    /// Short reasons for the log line and the quarantine entry.
    pub reasons: Vec<String>,
    pub flags: Vec<String>,
    /// The `Authentication-Results` value (one line), when verification ran.
    pub authentication_results: Option<String>,
    /// What verification found, when it ran (DMARC aggregate reports record it).
    pub auth: Option<Arc<AuthReport>>,
    /// What the outbound stage found, whenever it ran (passed or decided).
    pub outbound: Option<OutboundFindings>,
    /// What the rules read and concluded, when the decision log wants it (built only
    /// then: nobody else reads it).
    pub explained: Option<Box<Explained>>,
    /// Outbound DKIM signing, for the transaction log line ("" when nothing was signed).
    pub dkim: String,
}

impl Verdict {
    /// The rules stage's findings, after the outbound stage let the message through.
    /// The outbound stage's flags and reasons (an alert's) come first: the quarantine
    /// entry and the log line then say what both stages found.
    fn from_rules(found: RulesFindings, outbound: Option<OutboundFindings>) -> Verdict {
        let (mut flags, mut reasons) = (found.flags, found.reasons);
        if let Some(o) = &outbound {
            let a = &o.assessment;
            flags.splice(0..0, a.flags.iter().map(|f| f.to_string()));
            reasons.splice(0..0, a.reasons.iter().cloned());
        }
        Verdict {
            action: found.action,
            decided_by: DecidedBy::Rules,
            rule: found.rule,
            headers: found.headers,
            edits: found.edits,
            reasons,
            flags,
            authentication_results: found.authentication_results,
            auth: found.auth,
            outbound,
            explained: found.explained,
            dkim: String::new(),
        }
    }

    /// A verdict made before the rules (limits, outbound): nothing to add to the message.
    fn early(action: Action, decided_by: DecidedBy, rule: &str) -> Verdict {
        Verdict {
            action,
            decided_by,
            rule: rule.to_string(),
            headers: Vec::new(),
            edits: Vec::new(),
            reasons: Vec::new(),
            flags: Vec::new(),
            authentication_results: None,
            auth: None,
            outbound: None,
            explained: None,
            dkim: String::new(),
        }
    }

    /// The word of the transaction log line: `refused` for a limit, `hold` for an
    /// outbound hold, else the action.
    pub fn name(&self) -> &'static str {
        match (self.decided_by, &self.action) {
            (DecidedBy::Limits, _) => "refused",
            (DecidedBy::Outbound, Action::Quarantine) => "hold",
            (_, action) => action.name(),
        }
    }
}

/// Runs every stage over one message read at the end of DATA and carries out the
/// verdict. `relay` has MAIL and RCPT open at the next hop: it is reset unless the
/// message is relayed.
pub async fn run(
    s: &Services<'_>,
    cx: &Context<'_>,
    message: &[u8],
    stats: &DataStats,
    relay: &mut Relay,
) -> (Verdict, Reply) {
    if let Some((verdict, reply)) = limits::check(s, cx, message, stats) {
        relay.reset().await;
        return (verdict, reply);
    }
    let parsed = ParsedMessage::parse(message);
    let mut verdict = judge(s, cx, &parsed).await;
    let reply = action::carry_out(s, cx, &parsed, &mut verdict, relay).await;
    record::dmarc(s, cx, &verdict, &reply);
    record::decision(s, cx, &parsed, &mut verdict, &reply);
    (verdict, reply)
}

/// The deciding stages (outbound, then the rules), without carrying anything out.
pub async fn judge(s: &Services<'_>, cx: &Context<'_>, parsed: &ParsedMessage<'_>) -> Verdict {
    let outbound = match outbound::assess(s, cx, parsed).await {
        Some(found) if found.decisive() => {
            if found.held() {
                tracing::warn!(session = %cx.session_id, account = %found.account,
                    frozen = found.assessment.frozen,
                    reasons = %found.assessment.reasons.join("; "), "outbound: message held");
            }
            return outbound::verdict(found);
        }
        passed => passed,
    };
    let inputs = outbound.as_ref().map(OutboundFindings::inputs);
    let ctx = MessageContext {
        session_id: cx.session_id,
        client: cx.client,
        helo: cx.helo,
        role: cx.role,
        tls: cx.tls,
        mail_from: cx.mail_from,
        rcpts: cx.rcpts,
        message: parsed,
        outbound: inputs.as_ref(),
    };
    let found = s.inspector.inspect(&ctx).await;
    Verdict::from_rules(found, outbound)
}

#[cfg(test)]
mod tests;
