//! The outbound accounting stage (submission listeners with `[outbound]`): the message
//! is counted for its account (and, without AUTH, for its client) and the detector
//! says what it found (`crate::outbound::Detector::assess_as`).
//!
//! A defer, hold, freeze, reject, or a frozen account ends the pipeline here with the
//! replies the proxy has always given: held in quarantine; `550 5.7.1` "From address
//! not permitted for this account" for a From outside the account's policy, "Sending
//! limit exceeded for this account" for a volume breach; `451 4.7.1` "Sending rate
//! exceeded, try again later". Anything else (no finding, an alert, flags) goes on to
//! the rules as [`OutboundInputs`].

use super::{Context, DecidedBy, ParsedMessage, Services, Verdict};
use crate::config::Role;
use crate::outbound::{AccountFindings, Count, FLAG_FROM, OutboundAction};
use crate::policy::Action;
use crate::policy::inputs::OutboundInputs;
use crate::policy::rules::TraceEntry;
use crate::wire::reply::Reply;

/// What the outbound stage found for one message: the account it was counted for and
/// the detector's [`AccountFindings`] (kept as the detector gives it).
#[derive(Debug, Clone, PartialEq)]
pub struct OutboundFindings {
    pub account: String,
    pub assessment: AccountFindings,
    /// The counters the limits read for each key (the account, then the client), only
    /// when the decision log records them: building them costs a few allocations.
    pub counts: Vec<Count>,
}

impl OutboundFindings {
    /// Whether the stage decides alone: the rules are not asked.
    pub fn decisive(&self) -> bool {
        self.assessment.frozen
            || matches!(
                self.assessment.action,
                Some(
                    OutboundAction::Hold
                        | OutboundAction::Freeze
                        | OutboundAction::Reject
                        | OutboundAction::Defer
                )
            )
    }

    /// Held in quarantine (a frozen account, a hold or a freeze).
    pub fn held(&self) -> bool {
        self.assessment.frozen
            || matches!(
                self.assessment.action,
                Some(OutboundAction::Hold | OutboundAction::Freeze)
            )
    }

    /// The detector's action word (`none` when it had nothing to say).
    pub fn word(&self) -> &'static str {
        self.assessment.action.map_or("none", |a| a.as_str())
    }

    /// The stage's entry in the trace: `outbound=none`, `=alert`, `=defer`, `=hold`,
    /// `=freeze`, `=reject`, and `outbound=frozen` for an account frozen before.
    pub fn trace_entry(&self) -> TraceEntry {
        let a = &self.assessment;
        let word = match a.action {
            None | Some(OutboundAction::Alert) if a.frozen => "frozen",
            _ => self.word(),
        };
        TraceEntry {
            rule: "outbound".into(),
            matched: true,
            action: Some(word),
            shadow: false,
        }
    }

    /// Why the stage decided, in a few words (`check` shows it as the rule's reason).
    pub fn reason(&self) -> String {
        match self.action() {
            Action::Reject(reply) | Action::Defer(reply) => reply.summary(),
            _ if self.assessment.frozen => "Held: the account is frozen".into(),
            _ => "Held by the outbound stage".into(),
        }
    }

    /// What the rules read of a message this stage let through.
    pub fn inputs(&self) -> OutboundInputs {
        OutboundInputs {
            action: self.word().to_string(),
            flags: self
                .assessment
                .flags
                .iter()
                .map(|f| f.to_string())
                .collect(),
        }
    }

    /// The action of a decisive finding (see the module comment for the texts).
    pub fn action(&self) -> Action {
        let a = &self.assessment;
        if self.held() {
            return Action::Quarantine;
        }
        match a.action {
            Some(OutboundAction::Reject) if a.flags.contains(&FLAG_FROM) => {
                Action::Reject(Reply::from_not_permitted())
            }
            Some(OutboundAction::Reject) => Action::Reject(Reply::sending_limit_exceeded()),
            Some(OutboundAction::Defer) => Action::Defer(Reply::sending_rate_exceeded()),
            // Not decisive: the rules decide (never asked for here).
            Some(OutboundAction::Alert | OutboundAction::Hold | OutboundAction::Freeze) | None => {
                Action::Accept
            }
        }
    }
}

/// Counts the message and returns what the detector found; `None` when the stage does
/// not apply (not a submission listener, no detector, no account to count).
pub async fn assess(
    s: &Services<'_>,
    cx: &Context<'_>,
    parsed: &ParsedMessage<'_>,
) -> Option<OutboundFindings> {
    if cx.role != Role::Submission {
        return None;
    }
    let detector = s.outbound?;
    let account = detector.account(cx.login, cx.client.ip(), &cx.mail_from.address)?;
    // Without AUTH the envelope sender is whatever the client says: the client itself
    // is counted too, so that rotating MAIL FROM does not reset the limits.
    let client = detector.client_account(cx.login, cx.client.ip());
    let header_from = parsed.from_and_sender_addresses().join(", ");
    let rcpts: Vec<String> = cx.rcpts.iter().map(|r| r.address.clone()).collect();
    let (ip, client) = (cx.client.ip(), client.as_deref());
    let (assessment, counts) = if s.decision_log.is_some() {
        detector
            .assess_counted(&account, client, ip, &header_from, &rcpts, cx.rcpt_refused)
            .await
    } else {
        let found = detector
            .assess_as(&account, client, ip, &header_from, &rcpts, cx.rcpt_refused)
            .await;
        (found, Vec::new())
    };
    Some(OutboundFindings {
        account,
        assessment,
        counts,
    })
}

/// The verdict of a decisive finding: the pipeline ends here.
pub fn verdict(found: OutboundFindings) -> Verdict {
    let mut v = Verdict::early(found.action(), DecidedBy::Outbound, "outbound");
    v.reasons = found.assessment.reasons.clone();
    v.flags = found
        .assessment
        .flags
        .iter()
        .map(|f| f.to_string())
        .collect();
    v.outbound = Some(found);
    v
}
