//! The rules stage of the decision pipeline (`crate::pipeline`): header sanity, sender
//! authentication, the spoof flags and the operator's rules, behind the [`Inspector`]
//! trait.
//!
//! Why a trait still: the pipeline owns the order of the stages and the one `Verdict`;
//! the [`Inspector`] is the interface of the stage that changes with configuration
//! (`[auth] enabled` or not) and is swapped whole on reload. It also answers the
//! questions the session asks before DATA (`check_mail_from`, `recipient_class`) and
//! the admin API's (`policy_status`). [`AcceptAll`] is the stage with checks off;
//! [`engine::Enforcer`] the real one. Its result is [`RulesFindings`], one stage's
//! findings, which the pipeline folds into its `Verdict`.

pub mod cases;
pub mod engine;
pub mod inputs;
pub mod message;
pub mod rules;
pub mod sanity;
pub mod spoof;

use std::future::Future;
use std::net::SocketAddr;
use std::pin::Pin;

use smtp_proto::{MailFrom, RcptTo};

use crate::config::Role;
use crate::relay::writer::Edit;
use crate::wire::reply::Reply;

/// Everything known about a message when the rules stage runs. `'m` is the message's
/// own lifetime: its parts, parsed on first use, are kept inside it, which ties it.
pub struct MessageContext<'a, 'm> {
    pub session_id: &'a str,
    pub client: SocketAddr,
    pub helo: &'a str,
    pub role: Role,
    pub tls: bool,
    pub mail_from: &'a MailFrom<String>,
    pub rcpts: &'a [RcptTo<String>],
    /// The message, its header parsed once for every stage.
    pub message: &'a message::ParsedMessage<'m>,
    /// What the outbound stage found, when it ran and let the message through.
    pub outbound: Option<&'a inputs::OutboundInputs>,
}

/// What to do with a message.
#[derive(Debug, Clone)]
pub enum Action {
    /// Relay unchanged (apart from the added headers).
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

/// What the rules stage found: the action with what it adds to the message and why.
#[derive(Debug, Clone)]
pub struct RulesFindings {
    pub action: Action,
    /// The deciding rule (`default`, `submission`, `header-sanity`, a rule's name;
    /// `checks-off` for [`AcceptAll`]).
    pub rule: String,
    /// Header lines (without CRLF) to add at the top of the relayed message.
    pub headers: Vec<String>,
    /// Changes to the message when relaying, sorted: forged verification results left
    /// out, a subject prefix inserted.
    pub edits: Vec<Edit>,
    /// Short reasons for the log line and the quarantine entry.
    pub reasons: Vec<String>,
    /// Flags raised by the checks.
    pub flags: Vec<String>,
    /// The `Authentication-Results` value (one line), when verification ran.
    pub authentication_results: Option<String>,
    /// What verification found, when it ran (DMARC aggregate reports record it).
    pub auth: Option<std::sync::Arc<crate::auth::AuthReport>>,
    /// What the rules read and concluded, when the decision log wants it.
    pub explained: Option<Box<inputs::Explained>>,
}

impl RulesFindings {
    pub fn accept() -> RulesFindings {
        RulesFindings {
            action: Action::Accept,
            rule: "checks-off".into(),
            headers: Vec::new(),
            edits: Vec::new(),
            reasons: Vec::new(),
            flags: Vec::new(),
            authentication_results: None,
            auth: None,
            explained: None,
        }
    }
}

/// The rules stage. Implementations must not fail: every error (DNS down, broken
/// input) becomes a finding (typically `Defer`) with a reason.
pub trait Inspector: Send + Sync {
    fn inspect<'a>(
        &'a self,
        ctx: &'a MessageContext<'a, '_>,
    ) -> Pin<Box<dyn Future<Output = RulesFindings> + Send + 'a>>;

    /// An optional early refusal at MAIL FROM (SPF fail with `spf_early_reject`).
    fn check_mail_from<'a>(
        &'a self,
        _client: SocketAddr,
        _helo: &'a str,
        _mail_from: &'a str,
    ) -> Pin<Box<dyn Future<Output = Option<Reply>> + Send + 'a>> {
        Box::pin(async { None })
    }

    /// The policy class of a recipient: which recipient-dependent rules apply to it.
    /// Recipients of one transaction must share a class (they share one verdict), so a
    /// lenient rule for one domain can never carry another domain's recipients with it.
    fn recipient_class(&self, _role: Role, _rcpt: &str) -> Vec<usize> {
        Vec::new()
    }

    /// Re-reads what can change without a restart (the policy file). An error keeps
    /// the running version.
    fn reload(&self) -> Result<String, String> {
        Ok("nothing to reload".into())
    }

    /// The running policy's version and the result of the last reload.
    fn policy_status(&self) -> PolicyStatus {
        PolicyStatus {
            version: "none (checks off)".into(),
            last_reload: None,
        }
    }
}

/// For the admin API: which policy runs, and how the last reload went.
#[derive(Debug, Clone, serde::Serialize)]
pub struct PolicyStatus {
    pub version: String,
    /// `None` before the first reload; `Ok(version)` or `Err(reason)` after.
    pub last_reload: Option<Result<String, String>>,
}

/// The rules stage when checks are off (`[auth] enabled = false`): relay everything.
pub struct AcceptAll;

impl Inspector for AcceptAll {
    fn inspect<'a>(
        &'a self,
        _ctx: &'a MessageContext<'a, '_>,
    ) -> Pin<Box<dyn Future<Output = RulesFindings> + Send + 'a>> {
        Box::pin(async { RulesFindings::accept() })
    }
}
