//! After the verdict is carried out: what was decided goes to the decision log
//! (`crate::decision_log`) and what DMARC found to the aggregate reports
//! (`crate::dmarc_reports`). Neither ever waits nor fails the message.

use super::{Context, DecidedBy, ParsedMessage, Services, Verdict};
use crate::config::Role;
use crate::decision_log::{LoggedCount, LoggedHeaders, OutboundStage, Record, Stage};
use crate::dmarc_reports::evaluation::{self, Taken};
use crate::policy::Action;
use crate::policy::rules::ActionKind;
use crate::wire::reply::Reply;

/// One decision-log record per message that reached the outbound stage's decision or
/// the rules (with `[decision_log]` on). The explanation is moved out of the verdict,
/// not copied: the record is its only reader.
pub fn decision(
    s: &Services<'_>,
    cx: &Context<'_>,
    parsed: &ParsedMessage<'_>,
    verdict: &mut Verdict,
    reply: &Reply,
) {
    let Some(log) = s.decision_log else {
        return;
    };
    let explained = verdict.explained.take();
    let (stage, inputs, trace) = match (verdict.decided_by, explained) {
        (DecidedBy::Outbound, _) => (Stage::Outbound, None, outbound_trace(verdict)),
        (DecidedBy::Rules, Some(ex)) => (
            Stage::Policy,
            Some(ex.inputs),
            crate::decision_log::compact_trace(&ex.rule_match.trace),
        ),
        // No explanation: the rules stage runs no rules (checks off).
        (DecidedBy::Rules, None) | (DecidedBy::Limits, _) => return,
    };
    let action = action_kind(&verdict.action);
    let one = |name: &str| parsed.first(name).map(|v| v.trim().to_string());
    let quarantine_id = (action == ActionKind::Quarantine && reply.code == 250)
        .then(|| queued_id(reply))
        .flatten();
    log.record(Record {
        t: crate::decision_log::now_ms(),
        session: cx.session_id.to_string(),
        listener: super::action::role_name(cx.role),
        client: cx.client.to_string(),
        helo: cx.helo.to_string(),
        login: cx.login.map(str::to_string),
        mail_from: cx.mail_from.address.clone(),
        rcpts: cx.rcpts.iter().map(|r| r.address.clone()).collect(),
        headers: LoggedHeaders {
            from: one("From"),
            list_id: one("List-Id"),
            message_id: one("Message-ID"),
        },
        digest: crate::decision_log::digest(parsed.bytes),
        size: parsed.bytes.len(),
        stage,
        inputs,
        outbound: verdict.outbound.as_ref().map(|o| OutboundStage {
            account: o.account.clone(),
            action: o.word().to_string(),
            frozen: o.assessment.frozen,
            flags: o.assessment.flags.iter().map(|f| f.to_string()).collect(),
            reasons: o.assessment.reasons.clone(),
            counts: o
                .counts
                .iter()
                .map(|c| LoggedCount {
                    key: c.key.clone(),
                    name: c.name.clone(),
                    value: c.value,
                })
                .collect(),
        }),
        action,
        rule: verdict.rule.clone(),
        trace,
        reply: reply.code,
        quarantine_id,
    });
}

/// The trace of a verdict the outbound stage made alone: `outbound=hold`,
/// `outbound=reject`, … (`outbound=frozen` for an account frozen before).
fn outbound_trace(verdict: &Verdict) -> Vec<String> {
    let Some(o) = &verdict.outbound else {
        return Vec::new();
    };
    crate::decision_log::compact_trace(&[o.trace_entry()])
}

pub fn action_kind(action: &Action) -> ActionKind {
    match action {
        Action::Accept => ActionKind::Accept,
        Action::Tag => ActionKind::Tag,
        Action::Quarantine => ActionKind::Quarantine,
        Action::Reject(_) => ActionKind::Reject,
        Action::Defer(_) => ActionKind::Defer,
    }
}

/// The quarantine id in our own `250 2.0.0 Ok: queued as ID` (see `action::hold`).
fn queued_id(reply: &Reply) -> Option<String> {
    reply
        .summary()
        .rsplit_once("queued as ")
        .map(|(_, id)| id.trim().to_string())
        .filter(|id| crate::quarantine::QuarantineId::parse(id).is_some())
}

/// What DMARC found and what we really did, for the aggregate reports: inbound mail
/// only (reports are about mail other domains sent us), verified mail only.
pub fn dmarc(s: &Services<'_>, cx: &Context<'_>, verdict: &Verdict, reply: &Reply) {
    let Some(recorder) = s.dmarc_reports else {
        return;
    };
    if cx.role != Role::Inbound {
        return;
    }
    let Some(report) = &verdict.auth else {
        return;
    };
    let Some(taken) = taken(&verdict.action, reply) else {
        return;
    };
    let ctx = evaluation::Context {
        at: crate::dmarc_reports::now(),
        source_ip: cx.client.ip(),
        mail_from: &cx.mail_from.address,
        first_rcpt: cx.rcpts.first().map_or("", |r| r.address.as_str()),
        local_reason: verdict
            .reasons
            .last()
            .map_or("local policy", String::as_str),
    };
    if let Some(e) = evaluation::evaluate(report, taken, &ctx) {
        recorder.record(e);
    }
}

/// What happened to the message, from the verdict and the reply the client got. A 4xx
/// (our defer, or the next hop's) is not recorded: the sender retries, and the retry is
/// what the report should count, once.
fn taken(action: &Action, reply: &Reply) -> Option<Taken> {
    match reply.code {
        200..=299 => Some(match action {
            Action::Accept => Taken::Delivered,
            Action::Tag | Action::Quarantine => Taken::Quarantined,
            // A 2xx after a refusal cannot happen; count it as delivered if it did.
            Action::Reject(_) | Action::Defer(_) => Taken::Delivered,
        }),
        500..=599 => Some(Taken::Rejected),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::wire::reply::Enhanced;

    #[test]
    fn deferrals_are_not_counted_and_tags_are_quarantine() {
        let ok = Reply::new(250, Enhanced(2, 0, 0), "ok");
        let later = Reply::new(451, Enhanced(4, 7, 1), "later");
        let no = Reply::new(550, Enhanced(5, 7, 1), "no");
        assert_eq!(taken(&Action::Accept, &ok), Some(Taken::Delivered));
        assert_eq!(taken(&Action::Tag, &ok), Some(Taken::Quarantined));
        assert_eq!(taken(&Action::Quarantine, &ok), Some(Taken::Quarantined));
        assert_eq!(
            taken(&Action::Reject(no.clone()), &no),
            Some(Taken::Rejected)
        );
        assert_eq!(taken(&Action::Defer(later.clone()), &later), None);
        // Accepted by us, refused by the next hop: the message was refused.
        assert_eq!(taken(&Action::Accept, &no), Some(Taken::Rejected));
        assert_eq!(taken(&Action::Accept, &later), None);
    }
}
