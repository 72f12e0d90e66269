//! AUTH (RFC 4954) on submission listeners, after TLS only. mailwarden does not check
//! passwords: it collects the client's PLAIN or LOGIN credentials, logs in at the next
//! hop with them on the session's next-hop connection, and passes the answer back. The
//! password lives in memory for that exchange only and is never logged or stored; on
//! success the login name becomes the session's account (outbound burst detection).

use base64::Engine;

use crate::config::Role;
use crate::relay::Credentials;
use crate::relay::failure::{self, Stage};
use crate::smtp::session::{Flow, Helo, Session, State};
use crate::wire::codec::Line;
use crate::wire::reply::Reply;

/// Longest SASL response line (RFC 4954 §4: at least 12288 octets).
const MAX_SASL_LINE: usize = 12_288;

/// Why an exchange with the client ended without credentials.
enum Collect {
    Got(Credentials),
    Refused(Reply),
    Closed,
}

fn b64(s: &str) -> String {
    base64::engine::general_purpose::STANDARD.encode(s)
}

fn decode(s: &str) -> Option<Vec<u8>> {
    base64::engine::general_purpose::STANDARD
        .decode(s.trim())
        .ok()
}

impl Session {
    /// Whether EHLO offers AUTH here.
    pub(crate) fn offers_auth(&self) -> bool {
        self.listener.config.role == Role::Submission && self.is_tls()
    }

    pub(crate) async fn on_auth(
        &mut self,
        state: State,
        mechanism: u64,
        initial: String,
    ) -> (State, Flow) {
        let helo = match state {
            State::Ready(helo) if self.login.is_none() => helo,
            State::Ready(_) => {
                return self.refuse(state, Reply::already_authenticated()).await;
            }
            State::Fresh => {
                return self.refuse(state, Reply::need_ehlo()).await;
            }
            State::Transaction(..) => {
                return self.refuse(state, Reply::auth_in_transaction()).await;
            }
        };
        let state = State::Ready(helo.clone());
        if self.listener.config.role != Role::Submission {
            return self.refuse(state, Reply::auth_not_offered()).await;
        }
        if !self.is_tls() {
            return self.refuse(state, Reply::encryption_required()).await;
        }
        if let Some(detector) = self.shared.outbound.clone()
            && let Err(why) = detector.auth_allowed(self.peer.ip()).await
        {
            tracing::warn!(session = %self.id, client = %self.peer, reason = %why, "AUTH refused: address blocked");
            let reply = Reply::temp_auth_failure();
            return self.refuse(state, reply).await;
        }
        let creds = match mechanism {
            smtp_proto::AUTH_PLAIN => self.collect_plain(initial).await,
            smtp_proto::AUTH_LOGIN => self.collect_login(initial).await,
            _ => Collect::Refused(Reply::unknown_auth_mechanism()),
        };
        let creds = match creds {
            Collect::Got(c) => c,
            Collect::Refused(reply) => return self.refuse(state, reply).await,
            Collect::Closed => return (state, Flow::Close),
        };
        if let Some(detector) = self.shared.outbound.clone()
            && let Err(why) = detector
                .auth_user_allowed(self.peer.ip(), &creds.username)
                .await
        {
            tracing::warn!(session = %self.id, client = %self.peer, user = ?creds.username, reason = %why, "AUTH refused: user name locked");
            let reply = Reply::temp_auth_failure();
            return self.refuse(state, reply).await;
        }
        let reply = self.login_at_next_hop(&helo, &creds).await;
        // Only the next hop's definite answers count for credential-stuffing detection.
        if let Some(detector) = self.shared.outbound.clone()
            && (reply.code == 235 || reply.code == 535)
        {
            detector
                .auth_result(self.peer.ip(), &creds.username, reply.code == 235)
                .await;
        }
        if reply.code == 235 {
            tracing::info!(session = %self.id, client = %self.peer, user = ?creds.username, "authenticated");
            self.login = Some(creds.username.clone());
            self.stream.queue(&reply);
            return (state, Flow::Continue);
        }
        tracing::info!(session = %self.id, client = %self.peer, user = ?creds.username, reply = %reply.summary(), "authentication failed");
        self.refuse(state, reply).await
    }

    async fn refuse(&mut self, state: State, reply: Reply) -> (State, Flow) {
        let flow = self.error(reply).await;
        (state, flow)
    }

    async fn login_at_next_hop(&mut self, helo: &Helo, creds: &Credentials) -> Reply {
        let identity = self.identity(helo);
        if let Err(e) = self.relay.can_authenticate(&identity).await {
            return failure::report(&e, Stage::Auth, &self.id);
        }
        match self.relay.authenticate(&identity, creds).await {
            Ok(reply) if reply.code == 235 => Reply::auth_succeeded(),
            Ok(reply) if reply.is_transient() => Reply::temp_auth_failure(),
            Ok(_) => Reply::auth_invalid(),
            Err(e) => failure::report(&e, Stage::Auth, &self.id),
        }
    }

    /// One SASL response line from the client; `*` cancels (RFC 4954 §4).
    async fn sasl_line(&mut self, challenge: &str) -> Result<String, Collect> {
        self.stream.queue(&Reply::challenge(challenge));
        let timeout = self.config().limits.command_timeout;
        match self.stream.read_line(MAX_SASL_LINE, timeout).await {
            Ok(Line::Complete(bytes)) => {
                let text = String::from_utf8_lossy(&bytes)
                    .trim_end_matches(['\r', '\n'])
                    .to_string();
                if text == "*" {
                    Err(Collect::Refused(Reply::auth_cancelled()))
                } else {
                    Ok(text)
                }
            }
            Ok(Line::TooLong) => Err(Collect::Refused(Reply::auth_line_too_long())),
            Err(_) => Err(Collect::Closed),
        }
    }

    async fn collect_plain(&mut self, initial: String) -> Collect {
        let response = if initial.is_empty() {
            match self.sasl_line("").await {
                Ok(r) => r,
                Err(c) => return c,
            }
        } else {
            initial
        };
        let Some(blob) = decode(&response) else {
            return Collect::Refused(Reply::invalid_base64());
        };
        let mut parts = blob.split(|&b| b == 0);
        let (Some(authzid), Some(user), Some(pass), None) =
            (parts.next(), parts.next(), parts.next(), parts.next())
        else {
            return Collect::Refused(Reply::malformed_plain());
        };
        match (
            std::str::from_utf8(authzid),
            std::str::from_utf8(user),
            std::str::from_utf8(pass),
        ) {
            (Ok(z), Ok(u), Ok(p)) if !u.is_empty() => Collect::Got(Credentials {
                authzid: z.to_string(),
                username: u.to_string(),
                password: p.to_string(),
            }),
            _ => Collect::Refused(Reply::malformed_plain()),
        }
    }

    async fn collect_login(&mut self, initial: String) -> Collect {
        let user_b64 = if initial.is_empty() {
            match self.sasl_line(&b64("Username:")).await {
                Ok(r) => r,
                Err(c) => return c,
            }
        } else {
            initial
        };
        let pass_b64 = match self.sasl_line(&b64("Password:")).await {
            Ok(r) => r,
            Err(c) => return c,
        };
        let text = |s: &str| decode(s).and_then(|b| String::from_utf8(b).ok());
        match (text(&user_b64), text(&pass_b64)) {
            (Some(username), Some(password)) if !username.is_empty() => Collect::Got(Credentials {
                authzid: String::new(),
                username,
                password,
            }),
            _ => Collect::Refused(Reply::invalid_base64()),
        }
    }
}
