//! EHLO and HELO: (re)start the dialogue and list what we offer.

use crate::smtp::session::{Flow, Helo, Session, State};
use crate::wire::reply::Reply;

impl Session {
    pub(crate) async fn on_helo(
        &mut self,
        state: State,
        host: String,
        esmtp: bool,
    ) -> (State, Flow) {
        if host.trim().is_empty() {
            let verb = if esmtp { "EHLO" } else { "HELO" };
            let reply = Reply::syntax(format_args!("{verb} hostname"));
            return (state, self.error(reply).await);
        }
        // A new greeting ends any open transaction (RFC 5321 §4.1.4), and the next hop
        // was told the old HELO name: start over with a fresh connection when needed.
        if matches!(state, State::Transaction(..)) {
            self.relay.reset().await;
        }
        if state.helo().is_some_and(|h| h.name != host) {
            self.relay.close().await;
        }
        let hostname = &self.config().hostname;
        let reply = if esmtp {
            let mut lines = vec![
                format!("{hostname} Hello [{}]", self.peer.ip().to_canonical()),
                "PIPELINING".to_string(),
                format!("SIZE {}", self.config().limits.message_size_limit),
                "8BITMIME".to_string(),
                "SMTPUTF8".to_string(),
                "ENHANCEDSTATUSCODES".to_string(),
                "DSN".to_string(),
            ];
            if self.listener.tls.is_some() && !self.is_tls() {
                lines.push("STARTTLS".to_string());
            }
            if self.offers_auth() && self.login.is_none() {
                lines.push("AUTH PLAIN LOGIN".to_string());
            }
            Reply::plain(250, lines)
        } else {
            Reply::plain(250, vec![hostname.clone()])
        };
        self.ok(State::Ready(Helo { name: host, esmtp }), reply)
    }
}
