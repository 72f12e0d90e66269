//! Releasing a held message (an admin operation: the CLI and the API call it; it sits
//! above the quarantine, which only stores, because it re-injects, strips forged
//! headers and signs): re-injected through the next hop of the listener role that
//! accepted it (inbound mail to the inbound smtpd, submissions to the submission one),
//! with its original envelope, client (XCLIENT, including the SASL login as `LOGIN=`) and
//! `Authentication-Results`, exactly once.
//!
//! The entry moves `held → releasing` in one guarded index update before anything is
//! sent, so two releases can never both send it. A clear failure moves it back to `held`:
//! a 4xx or an unreachable next hop is worth retrying later; a 5xx is a permanent refusal
//! (the next hop's policy says no: retrying the same release would get the same answer). If the connection dies after the whole
//! message was sent, nobody knows whether the next hop has it: the entry stays
//! `releasing` and only `release --force` (after checking the next hop) sends it again.

use std::net::SocketAddr;

use smtp_proto::{MailFrom, RcptTo};

use crate::quarantine::{QuarantineId, QuarantineStore, State, StoreError};
use crate::relay::one_shot::{self, Sent};
use crate::relay::{ClientIdentity, NextHops, RelayError};
use crate::wire::reply::Reply;

#[derive(Debug, thiserror::Error)]
pub enum ReleaseError {
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error(
        "permanent refusal by the next hop: {0} (entry stays held; retrying will not help: check the next hop's policy, or release --to other recipients)"
    )]
    Refused(Reply),
    #[error("next hop deferred it: {0} (entry is held again; retry later)")]
    Deferred(Reply),
    #[error("next hop unavailable: {0} (entry is held again; retry later)")]
    Failed(RelayError),
    #[error(
        "outcome unknown: {0}. The entry stays `releasing`; check the next hop's log, then `release --force` if it did not arrive"
    )]
    Unsettled(RelayError),
    #[error("entry is already released")]
    AlreadyReleased,
}

/// What the next hop is told about the original client (XCLIENT), from the entry.
fn identity(client: &str, helo: &str, login: Option<&str>) -> ClientIdentity {
    ClientIdentity {
        addr: client
            .parse()
            .unwrap_or_else(|_| SocketAddr::from(([127, 0, 0, 1], 0))),
        helo: Some(helo.to_string()).filter(|h| !h.is_empty()),
        esmtp: true,
        login: login.filter(|l| !l.is_empty()).map(str::to_string),
    }
}

/// What a release does to the message on its way out.
#[derive(Clone, Copy)]
pub struct Outgoing<'a> {
    /// Our `Authentication-Results` id: forged ones are left out.
    pub authserv_id: &'a str,
    /// Our verdict header: a forged one is left out.
    pub verdict_header: &'a str,
    /// Outbound DKIM signing, for entries of a submission listener.
    pub signer: Option<&'a crate::signing::Signer>,
}

/// Releases one entry to its original recipients, or to `to` when given.
pub async fn release(
    store: &dyn QuarantineStore,
    hops: &NextHops,
    id: &QuarantineId,
    to: &[String],
    force: bool,
    out: Outgoing<'_>,
) -> Result<Reply, ReleaseError> {
    let started = match store.transition(id, State::Held, State::Releasing).await {
        Err(StoreError::WrongState {
            state: State::Releasing,
            ..
        }) if force => {
            store
                .transition(id, State::Releasing, State::Releasing)
                .await
        }
        other => other,
    };
    match started {
        Ok(()) => send(store, hops, id, to, out).await,
        Err(StoreError::WrongState {
            state: State::Released,
            ..
        }) => Err(ReleaseError::AlreadyReleased),
        Err(e) => Err(e.into()),
    }
}

async fn send(
    store: &dyn QuarantineStore,
    hops: &NextHops,
    id: &QuarantineId,
    to: &[String],
    out: Outgoing<'_>,
) -> Result<Reply, ReleaseError> {
    let meta = store.meta(id).await?;
    let message = store.message(id).await?;
    let from = MailFrom {
        address: meta.mail_from.clone(),
        size: message.len(),
        ..Default::default()
    };
    let rcpt_list = if to.is_empty() { &meta.rcpts } else { to };
    let rcpts: Vec<RcptTo<String>> = rcpt_list
        .iter()
        .map(|r| RcptTo {
            address: r.clone(),
            ..Default::default()
        })
        .collect();
    let fields = crate::auth::headers::fields(&message);
    let edits: Vec<crate::relay::writer::Edit> =
        crate::auth::headers::forged_ranges(&fields, out.authserv_id, out.verdict_header)
            .into_iter()
            .map(crate::relay::writer::Edit::remove)
            .collect();
    let parts = crate::relay::writer::edited(&message, &edits);
    let mut headers = Vec::new();
    if !meta.authentication_results.is_empty() {
        headers.push(format!(
            "Authentication-Results: {}",
            meta.authentication_results
        ));
    }
    // An outbound entry leaves signed, as it would have without the hold (signed now:
    // t= is the release time, and a key rolled over meanwhile is the one used).
    if meta.listener == "submission"
        && let Some(signer) = out.signer
    {
        let signing = crate::signing::record(signer.sign(&headers, &parts));
        tracing::info!(id = %id, dkim_sign = %signing.summary(), "quarantine: release signing");
        headers.splice(0..0, signing.headers().iter().cloned());
    }

    let client = identity(&meta.client, &meta.helo, meta.login.as_deref());
    let outgoing = one_shot::Message {
        client: &client,
        from: &from,
        rcpts: &rcpts,
        size: message.len(),
        headers: &headers,
        parts: &parts,
    };
    // All recipients or none: a refused one refuses the release (the entry stays held).
    let sent = one_shot::send(hops.for_role(&meta.listener), outgoing, |_, _| false).await;
    match sent {
        Ok(Sent::Delivered { reply, .. }) => {
            store
                .transition(id, State::Releasing, State::Released)
                .await?;
            tracing::info!(id = %id, reply = %reply, "quarantine: released");
            Ok(reply)
        }
        Ok(Sent::Refused(reply)) => {
            store.transition(id, State::Releasing, State::Held).await?;
            tracing::warn!(id = %id, reply = %reply.summary(), "quarantine: release refused by the next hop");
            if reply.is_transient() {
                Err(ReleaseError::Deferred(reply))
            } else {
                Err(ReleaseError::Refused(reply))
            }
        }
        Err(RelayError::Unsettled(e)) => Err(ReleaseError::Unsettled(*e)),
        Err(e) => {
            store.transition(id, State::Releasing, State::Held).await?;
            Err(ReleaseError::Failed(e))
        }
    }
}
