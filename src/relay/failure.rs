//! The one place a next-hop failure becomes what the client, the log and the metrics see.
//!
//! A [`RelayError`] has three faces (STYLE.md "errors have three faces"): the typed
//! error, a generic reply for the client (details never reach the sender), and a log
//! line plus a metric for the operator. Handlers call [`report`] and send what it
//! returns; they do not build any of the three themselves.

use std::fmt;

use super::RelayError;
use crate::wire::reply::Reply;

/// Where in the session the next hop failed: names the log line and picks the reply.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Stage {
    /// Opening the next-hop transaction (connect, EHLO, XCLIENT, MAIL) at the first RCPT.
    Mail,
    Rcpt,
    /// Sending the message and waiting for the final reply.
    EndOfData,
    /// Relaying AUTH to the next hop (submission listeners).
    Auth,
}

impl fmt::Display for Stage {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Stage::Mail => "MAIL",
            Stage::Rcpt => "RCPT",
            Stage::EndOfData => "end of data",
            Stage::Auth => "AUTH",
        })
    }
}

impl RelayError {
    /// A short label for metrics (`next_hop_errors{kind}`).
    pub fn kind(&self) -> &'static str {
        match self {
            RelayError::Connect(_) | RelayError::ConnectTimeout => "connect",
            RelayError::Timeout(_) => "timeout",
            RelayError::Closed | RelayError::Io(_) => "closed",
            RelayError::Protocol(_) | RelayError::Tls(_) => "protocol",
            RelayError::Rejected(_) | RelayError::Policy(_) => "refused",
            RelayError::Insecure(_) => "insecure",
            RelayError::Maildir(_) => "maildir",
            RelayError::Unsettled(_) => "unsettled",
        }
    }

    /// The reply the client gets for a mail transaction. Always 4xx: whatever went
    /// wrong, the client keeps responsibility for the message and retries. Generic
    /// text: details go to the log, not to the sender.
    pub fn reply(&self) -> Reply {
        match self {
            RelayError::Connect(_) | RelayError::ConnectTimeout => Reply::next_hop_unavailable(),
            RelayError::Unsettled(inner) => inner.reply(),
            RelayError::Insecure(_) => Reply::no_secure_next_hop(),
            RelayError::Policy(_) | RelayError::Maildir(_) => Reply::temp_local_problem(),
            _ => Reply::next_hop_failed(),
        }
    }
}

/// Logs and counts `e`, and returns the reply for the client of session `session`.
pub fn report(e: &RelayError, stage: Stage, session: &str) -> Reply {
    let m = crate::metrics::global();
    if stage == Stage::Auth {
        return match e {
            // A link that may not carry a password, or a next-hop certificate that failed
            // verification, is a configuration (or attack) problem every login hits:
            // ERROR, so it is seen. Credentials were not sent.
            RelayError::Insecure(_) | RelayError::Tls(_) => {
                tracing::error!(session = %session, error = %e, "AUTH refused: credentials are only relayed to a loopback next hop or over verified TLS");
                m.auth_relay_insecure.inc();
                Reply::no_secure_next_hop()
            }
            // The next hop down, or it offers no PLAIN/LOGIN: WARN, the client retries.
            _ => {
                tracing::warn!(session = %session, error = %e, "AUTH: next hop unavailable or offers no PLAIN/LOGIN");
                Reply::temp_auth_failure()
            }
        };
    }
    m.next_hop_errors
        .get_or_create(&crate::metrics::label("kind", e.kind()))
        .inc();
    tracing::warn!(session = %session, error = %e, "next hop failed at {stage}");
    e.reply()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::wire::reply::Enhanced;

    #[test]
    fn insecure_link_refusal_is_454_4_7_0() {
        let r = RelayError::Insecure("x").reply();
        assert_eq!((r.code, r.enhanced), (454, Some(Enhanced(4, 7, 0))));
        assert_eq!(
            report(&RelayError::Tls("bad cert".into()), Stage::Auth, "s"),
            r
        );
    }

    #[test]
    fn every_transaction_failure_is_transient_and_counted() {
        let errors = [
            RelayError::ConnectTimeout,
            RelayError::Timeout("DATA"),
            RelayError::Closed,
            RelayError::Protocol("x".into()),
            RelayError::Policy("x"),
            RelayError::Unsettled(Box::new(RelayError::Closed)),
        ];
        let counted = |kind| {
            crate::metrics::global()
                .next_hop_errors
                .get_or_create(&crate::metrics::label("kind", kind))
                .get()
        };
        for e in &errors {
            let before = counted(e.kind());
            let r = report(e, Stage::Rcpt, "s");
            assert!(r.is_transient(), "{e}: {r}");
            assert!(counted(e.kind()) > before, "{e} not counted");
        }
        // An unsettled end of data answers as its cause does.
        assert_eq!(errors[5].reply(), Reply::next_hop_failed());
        // AUTH failures say nothing about the message and are not next-hop errors.
        let before = counted("connect");
        assert_eq!(
            report(&RelayError::ConnectTimeout, Stage::Auth, "s"),
            Reply::temp_auth_failure()
        );
        assert_eq!(counted("connect"), before);
    }
}
