//! RCPT TO: the relay check, then the next hop's own answer passed through.

use smtp_proto::RcptTo;

use crate::config::Role;
use crate::relay::Opening;
use crate::relay::failure::{self, Stage};
use crate::smtp::session::{Flow, Helo, Session, State, Transaction};
use crate::wire::reply::Reply;

impl Session {
    pub(crate) async fn on_rcpt(&mut self, state: State, to: RcptTo<String>) -> (State, Flow) {
        let State::Transaction(helo, mut tx) = state else {
            let reply = Reply::need_mail();
            return (state, self.error(reply).await);
        };
        if tx.rcpt_attempts >= self.config().limits.max_recipients {
            let reply = Reply::too_many_recipients();
            return (State::Transaction(helo, tx), self.error(reply).await);
        }
        tx.rcpt_attempts += 1;
        // Per-recipient policy: one transaction gets one verdict, so every recipient in it
        // must fall under the same rules. A recipient whose rules differ from the first
        // accepted one's is asked for again in another transaction (452: the sender's MTA
        // does that by itself, RFC 5321 §4.5.3.1.10), before the next hop hears of it.
        let class = self
            .shared
            .inspector
            .recipient_class(self.listener.config.role, &to.address);
        if tx
            .policy_class
            .as_ref()
            .is_some_and(|first| *first != class)
        {
            crate::metrics::global().recipient_policy_splits.inc();
            tracing::info!(session = %self.id, rcpt = %to.address, "recipient policy differs: 452, another transaction");
            self.stream.queue(&Reply::recipient_policy_differs());
            return (State::Transaction(helo, tx), Flow::Continue);
        }
        let reply = self.rcpt_reply(&helo, &mut tx, &to).await;
        if !reply.is_positive() {
            tx.rcpt_refused += 1;
        }
        let flow = if reply.is_positive() {
            tx.policy_class.get_or_insert(class);
            tx.rcpts.push(to);
            self.stream.queue(&reply);
            Flow::Continue
        } else {
            self.error(reply).await
        };
        (State::Transaction(helo, tx), flow)
    }

    async fn rcpt_reply(
        &mut self,
        helo: &Helo,
        tx: &mut Transaction,
        to: &RcptTo<String>,
    ) -> Reply {
        if self.listener.config.role == Role::Inbound && !self.accepts_domain_of(&to.address) {
            tracing::info!(session = %self.id, client = %self.peer, rcpt = %to.address, "relay denied");
            return Reply::relay_denied();
        }
        if let Some(failure) = &tx.relay_failure {
            return failure.clone();
        }
        let result = if tx.relay_started {
            self.relay.rcpt(to).await
        } else {
            // MAIL goes to the next hop with the first recipient (one round trip).
            let identity = self.identity(helo);
            match self
                .relay
                .start(&identity, &tx.from, tx.from.size, to)
                .await
            {
                Ok(Opening::Started(result)) => {
                    tx.relay_started = true;
                    result
                }
                Ok(Opening::Refused(reply)) => {
                    tx.relay_failure = Some(reply.clone());
                    return reply;
                }
                Err(e) => {
                    let reply = failure::report(&e, Stage::Mail, &self.id);
                    tx.relay_failure = Some(reply.clone());
                    return reply;
                }
            }
        };
        match result {
            Ok(reply) => {
                if reply.closes_session() {
                    tx.relay_failure = Some(reply.clone());
                }
                reply
            }
            Err(e) => {
                let reply = failure::report(&e, Stage::Rcpt, &self.id);
                tx.relay_failure = Some(reply.clone());
                reply
            }
        }
    }

    /// Inbound listeners take mail for our own domains only. An address without a
    /// domain (`postmaster`, RFC 5321 §4.5.1) is ours by definition.
    fn accepts_domain_of(&self, address: &str) -> bool {
        match address.rsplit_once('@') {
            Some((_, domain)) => self.config().is_local_domain(domain),
            None => !address.is_empty(),
        }
    }
}
