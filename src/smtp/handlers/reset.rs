//! RSET: end the transaction here and at the next hop.

use crate::smtp::session::{Flow, Session, State};
use crate::wire::reply::Reply;

impl Session {
    pub(crate) async fn on_rset(&mut self, state: State) -> (State, Flow) {
        let next = match state {
            State::Transaction(helo, _) => {
                self.relay.reset().await;
                State::Ready(helo)
            }
            other => other,
        };
        self.ok(next, Reply::ok())
    }
}
