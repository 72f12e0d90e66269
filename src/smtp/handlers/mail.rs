//! MAIL FROM: opens a transaction. Answered by us after checks; the next hop sees MAIL
//! when the first recipient arrives (so its own recipient checks can answer in real time).

use std::time::Instant;

use smtp_proto::MailFrom;

use crate::smtp::reply::{Enhanced, Reply};
use crate::smtp::session::{Flow, Session, State, Transaction};

impl Session {
    pub(crate) async fn on_mail(&mut self, state: State, from: MailFrom<String>) -> (State, Flow) {
        let helo = match state {
            State::Ready(helo) => helo,
            State::Fresh => {
                let reply = Reply::new(503, Enhanced(5, 5, 1), "Send EHLO/HELO first");
                return (State::Fresh, self.error(reply).await);
            }
            State::Transaction(..) => {
                let reply = Reply::new(503, Enhanced(5, 5, 1), "Nested MAIL command");
                return (state, self.error(reply).await);
            }
        };
        let limits = &self.config().limits;
        if self.transactions >= limits.max_transactions {
            self.say_goodbye(Reply::new(
                421,
                Enhanced(4, 7, 0),
                "Too many transactions, reconnect",
            ))
            .await;
            return (State::Ready(helo), Flow::Close);
        }
        if from.size > limits.message_size_limit {
            let reply = Reply::new(552, Enhanced(5, 3, 4), "Message size exceeds fixed limit");
            return (State::Ready(helo), self.error(reply).await);
        }
        if from.flags & smtp_proto::MAIL_BODY_BINARYMIME != 0 {
            let reply = Reply::new(504, Enhanced(5, 5, 4), "BINARYMIME not offered");
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
        self.ok(
            State::Transaction(helo, Box::new(tx)),
            Reply::new(250, Enhanced(2, 1, 0), "Ok"),
        )
    }
}
