//! After a verdict is carried out: what the policy saw and decided, for the decision
//! log (`crate::decision_log`). Never waits, never fails the message.

use crate::decision_log::{LoggedHeaders, OutboundStage, Record, Stage};
use crate::outbound::{Assessment, OutboundAction};
use crate::policy::Decision;
use crate::policy::rules::ActionKind;
use crate::smtp::session::{Helo, Session, Transaction};
use crate::wire::reply::Reply;

/// Which stage decided, with what it decided.
pub(super) enum Decided<'a> {
    Policy(&'a Decision),
    Outbound {
        account: &'a str,
        assessment: &'a Assessment,
    },
}

impl Session {
    pub(super) fn log_decision(
        &self,
        helo: &Helo,
        tx: &Transaction,
        message: &[u8],
        decided: Decided<'_>,
        reply: &Reply,
    ) {
        let Some(log) = &self.shared.decision_log else {
            return;
        };
        let (stage, inputs, outbound, action, rule, trace) = match decided {
            Decided::Policy(decision) => {
                // No explanation: the inspector runs no rules (checks off).
                let Some(ex) = &decision.explained else {
                    return;
                };
                (
                    Stage::Policy,
                    Some(ex.inputs.clone()),
                    None,
                    ex.evaluation.action,
                    ex.evaluation.rule.clone(),
                    crate::decision_log::compact_trace(&ex.evaluation.trace),
                )
            }
            Decided::Outbound {
                account,
                assessment: a,
            } => {
                let action = if a.frozen {
                    ActionKind::Quarantine
                } else {
                    match a.action {
                        Some(OutboundAction::Hold | OutboundAction::Freeze) => {
                            ActionKind::Quarantine
                        }
                        Some(OutboundAction::Reject) => ActionKind::Reject,
                        Some(OutboundAction::Defer) => ActionKind::Defer,
                        Some(OutboundAction::Alert) | None => ActionKind::Accept,
                    }
                };
                let stage = OutboundStage {
                    account: account.to_string(),
                    action: a.action.map_or("none", |x| x.as_str()).to_string(),
                    frozen: a.frozen,
                    flags: a.flags.iter().map(|f| f.to_string()).collect(),
                    reasons: a.reasons.clone(),
                };
                (
                    Stage::Outbound,
                    None,
                    Some(stage),
                    action,
                    "outbound".to_string(),
                    Vec::new(),
                )
            }
        };
        let fields = crate::auth::headers::fields(message);
        let one = |name: &str| {
            crate::auth::headers::first(&fields, name).map(|f| f.value.trim().to_string())
        };
        let quarantine_id = (action == ActionKind::Quarantine && reply.code == 250)
            .then(|| queued_id(reply))
            .flatten();
        log.record(Record {
            t: crate::decision_log::now_ms(),
            session: self.id.clone(),
            listener: format!("{:?}", self.listener.config.role).to_lowercase(),
            client: self.peer.to_string(),
            helo: helo.name.clone(),
            login: self.login.clone(),
            mail_from: tx.from.address.clone(),
            rcpts: tx.rcpts.iter().map(|r| r.address.clone()).collect(),
            headers: LoggedHeaders {
                from: one("From"),
                list_id: one("List-Id"),
                message_id: one("Message-ID"),
            },
            digest: crate::decision_log::digest(message),
            size: message.len(),
            stage,
            inputs,
            outbound,
            action,
            rule,
            trace,
            reply: reply.code,
            quarantine_id,
        });
    }
}

/// The quarantine id in our own `250 2.0.0 Ok: queued as ID` (see `hold`).
fn queued_id(reply: &Reply) -> Option<String> {
    reply
        .summary()
        .rsplit_once("queued as ")
        .map(|(_, id)| id.trim().to_string())
        .filter(|id| crate::quarantine::QuarantineId::parse(id).is_some())
}
