//! STARTTLS (RFC 3207): upgrade the connection and forget everything said before it.

use crate::config::defaults::TLS_HANDSHAKE_TIMEOUT;
use crate::smtp::session::{Flow, Session, State};
use crate::tls::MaybeTls;
use crate::wire::codec::SmtpStream;
use crate::wire::reply::Reply;

impl Session {
    pub(crate) async fn on_starttls(&mut self, state: State) -> (State, Flow) {
        let Some(acceptor) = self.listener.tls.clone().filter(|_| !self.is_tls()) else {
            let reply = Reply::starttls_unavailable();
            return (state, self.error(reply).await);
        };
        if matches!(state, State::Transaction(..)) {
            let reply = Reply::starttls_in_transaction();
            return (state, self.error(reply).await);
        }
        let ready = Reply::ready_for_tls();
        if self.stream.send(&ready).await.is_err() {
            return (state, Flow::Close);
        }
        // Anything the client pipelined after STARTTLS arrived in plain text and could
        // have been injected by a man in the middle (CVE-2011-0411): it is dropped with
        // the old buffer, never read as commands.
        let old = std::mem::replace(&mut self.stream, SmtpStream::new(MaybeTls::Detached));
        let injected = old.buffered();
        if injected > 0 {
            tracing::warn!(session = %self.id, client = %self.peer, bytes = injected, "discarded input pipelined before the TLS handshake");
        }
        let MaybeTls::Plain(tcp) = old.into_inner_discarding_input() else {
            return (state, Flow::Close);
        };
        match tokio::time::timeout(TLS_HANDSHAKE_TIMEOUT, acceptor.accept(tcp)).await {
            Ok(Ok(tls)) => {
                self.stream = SmtpStream::new(MaybeTls::Tls(Box::new(tls)));
                // RFC 3207 §4.2: the client must start over with EHLO. The next hop was
                // told the old HELO, so close that connection too.
                self.relay.close().await;
                self.login = None;
                (State::Fresh, Flow::Continue)
            }
            Ok(Err(e)) => {
                tracing::info!(session = %self.id, client = %self.peer, error = %e, "TLS handshake failed");
                (State::Fresh, Flow::Close)
            }
            Err(_) => {
                tracing::info!(session = %self.id, client = %self.peer, "TLS handshake timed out");
                (State::Fresh, Flow::Close)
            }
        }
    }
}
