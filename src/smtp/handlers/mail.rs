//! MAIL FROM: opens a transaction. Answered by us after checks; the next hop sees MAIL
//! when the first recipient arrives (so its own recipient checks can answer in real time).

use std::time::Instant;

use smtp_proto::MailFrom;

use crate::config::Role;
use crate::smtp::session::{Flow, Session, State, Transaction};
use crate::wire::reply::Reply;

impl Session {
    /// Whether this session may start a transaction: on an inbound listener always (its
    /// mail is checked); on a submission listener after a successful AUTH, or from
    /// `[outbound] trusted_networks` when the outbound detector accounts for it (the
    /// envelope sender is then the account). There is no third way in.
    pub(crate) fn may_submit(&self) -> bool {
        if self.listener.config.role != Role::Submission || self.login.is_some() {
            return true;
        }
        let ip = self.peer.ip().to_canonical();
        self.shared.outbound.is_some()
            && self
                .config()
                .outbound
                .trusted_networks
                .iter()
                .any(|n| n.contains(&ip))
    }

    pub(crate) async fn on_mail(&mut self, state: State, from: MailFrom<String>) -> (State, Flow) {
        let helo = match state {
            State::Ready(helo) => helo,
            State::Fresh => {
                let reply = Reply::need_helo();
                return (State::Fresh, self.error(reply).await);
            }
            State::Transaction(..) => {
                let reply = Reply::nested_mail();
                return (state, self.error(reply).await);
            }
        };
        if !self.may_submit() {
            // RFC 6409 §4.3 / RFC 4954 §6: a submission server refuses mail from a
            // client that has not authenticated. Otherwise port 587 would be a way
            // around every inbound check, counted as nobody's.
            tracing::info!(session = %self.id, client = %self.peer, from = %from.address, "submission without AUTH refused");
            let reply = Reply::auth_required();
            return (State::Ready(helo), self.error(reply).await);
        }
        let limits = &self.config().limits;
        if self.transactions >= limits.max_transactions {
            self.say_goodbye(Reply::too_many_transactions()).await;
            return (State::Ready(helo), Flow::Close);
        }
        if from.size > limits.message_size_limit {
            let reply = Reply::message_too_big();
            return (State::Ready(helo), self.error(reply).await);
        }
        if from.flags & smtp_proto::MAIL_BODY_BINARYMIME != 0 {
            let reply = Reply::binarymime_not_offered();
            return (State::Ready(helo), self.error(reply).await);
        }
        let early = self
            .shared
            .inspector
            .check_mail_from(self.peer, &helo.name, &from.address)
            .await;
        if let Some(reply) = early {
            tracing::info!(session = %self.id, client = %self.peer, from = %from.address, reply = %reply, "refused at MAIL FROM");
            return (State::Ready(helo), self.error(reply).await);
        }
        self.transactions += 1;
        let tx = Transaction {
            from,
            rcpts: Vec::new(),
            rcpt_attempts: 0,
            rcpt_refused: 0,
            relay_started: false,
            relay_failure: None,
            policy_class: None,
            started: Instant::now(),
        };
        self.ok(State::Transaction(helo, Box::new(tx)), Reply::sender_ok())
    }
}
