//! After a verdict is carried out: what DMARC found and what we really did, for the
//! aggregate reports (`crate::dmarc_reports`). Never waits, never fails the message.

use crate::config::Role;
use crate::dmarc_reports::evaluation::{self, Context, Taken};
use crate::policy::{Action, Decision};
use crate::smtp::session::{Session, Transaction};
use crate::wire::reply::Reply;

impl Session {
    pub(super) fn record_dmarc(&self, tx: &Transaction, decision: &Decision, reply: &Reply) {
        let Some(recorder) = &self.shared.dmarc_reports else {
            return;
        };
        // Reports are about mail other domains sent us: not our own users' submissions.
        if self.listener.config.role != Role::Inbound {
            return;
        }
        let Some(report) = &decision.auth else {
            return;
        };
        let Some(taken) = taken(&decision.action, reply) else {
            return;
        };
        let ctx = Context {
            at: crate::dmarc_reports::now(),
            source_ip: self.peer.ip(),
            mail_from: &tx.from.address,
            first_rcpt: tx.rcpts.first().map_or("", |r| r.address.as_str()),
            local_reason: decision
                .reasons
                .last()
                .map_or("local policy", String::as_str),
        };
        if let Some(e) = evaluation::evaluate(report, taken, &ctx) {
            recorder.record(e);
        }
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
