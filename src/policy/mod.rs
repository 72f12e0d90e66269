//! The verdict hook: after the whole message is read and before anything is relayed,
//! the session asks an [`Inspector`] what to do with it.
//!
//! The relay issue ships [`AcceptAll`]; sender authentication and the operator's policy
//! plug in here by implementing [`Inspector`].

use std::future::Future;
use std::net::SocketAddr;
use std::pin::Pin;

use smtp_proto::{MailFrom, RcptTo};

use crate::config::Role;
use crate::smtp::reply::Reply;

/// Everything known about a message when its verdict is asked for.
pub struct MessageContext<'a> {
    pub session_id: &'a str,
    pub client: SocketAddr,
    pub helo: &'a str,
    pub role: Role,
    pub tls: bool,
    pub mail_from: &'a MailFrom<String>,
    pub rcpts: &'a [RcptTo<String>],
    /// The canonical message (CRLF lines, dot-stuffing removed).
    pub message: &'a [u8],
}

/// What to do with a message.
#[derive(Debug, Clone)]
pub enum Action {
    /// Relay unchanged (apart from `Decision::headers`).
    Accept,
    /// Relay, marked as suspicious in the added headers.
    Tag,
    /// Hold in quarantine; the client gets 250 once the store has it durably.
    Quarantine,
    /// Refuse with this 5xx reply.
    Reject(Reply),
    /// Ask the client to retry later with this 4xx reply.
    Defer(Reply),
}

impl Action {
    pub fn name(&self) -> &'static str {
        match self {
            Action::Accept => "accept",
            Action::Tag => "tag",
            Action::Quarantine => "quarantine",
            Action::Reject(_) => "reject",
            Action::Defer(_) => "defer",
        }
    }
}

/// A verdict with what it adds to the message and why.
#[derive(Debug, Clone)]
pub struct Decision {
    pub action: Action,
    /// Header lines (without CRLF) to add at the top of the relayed message.
    pub headers: Vec<String>,
    /// Header names to remove before relaying (forged verification results).
    pub strip_headers: Vec<String>,
    /// Short reasons for the log line.
    pub reasons: Vec<String>,
}

impl Decision {
    pub fn accept() -> Decision {
        Decision {
            action: Action::Accept,
            headers: Vec::new(),
            strip_headers: Vec::new(),
            reasons: Vec::new(),
        }
    }
}

/// Decides a message's fate. Implementations must not fail: every error (DNS down,
/// broken input) becomes a decision (typically `Defer`) with a reason.
pub trait Inspector: Send + Sync {
    fn inspect<'a>(
        &'a self,
        ctx: &'a MessageContext<'a>,
    ) -> Pin<Box<dyn Future<Output = Decision> + Send + 'a>>;
}

/// The verdict used until verification is configured: relay everything.
pub struct AcceptAll;

impl Inspector for AcceptAll {
    fn inspect<'a>(
        &'a self,
        _ctx: &'a MessageContext<'a>,
    ) -> Pin<Box<dyn Future<Output = Decision> + Send + 'a>> {
        Box::pin(async { Decision::accept() })
    }
}
