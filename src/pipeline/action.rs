//! The last stage: carry the verdict out. Relay (with outbound DKIM signing on
//! submission listeners), hold in quarantine, or refuse; every path ends in the reply
//! the client gets. A 250 goes out only after the next hop's 2xx or a durable
//! quarantine write.

use super::{Context, ParsedMessage, Services, Verdict};
use crate::config::Role;
use crate::policy::Action;
use crate::quarantine::{Meta, StoreError};
use crate::relay::failure::Stage;
use crate::relay::{Envelope, Relay};
use crate::wire::reply::Reply;
use crate::wire::trace;

pub async fn carry_out(
    s: &Services<'_>,
    cx: &Context<'_>,
    parsed: &ParsedMessage<'_>,
    verdict: &mut Verdict,
    relay: &mut Relay,
) -> Reply {
    match &verdict.action {
        Action::Reject(reply) | Action::Defer(reply) => {
            relay.reset().await;
            reply.clone()
        }
        Action::Quarantine => {
            relay.reset().await;
            hold(s, cx, parsed, verdict).await
        }
        Action::Accept | Action::Tag => deliver(s, cx, parsed, verdict, relay).await,
    }
}

/// Relays with the verdict's headers and edits, signed on submission listeners.
async fn deliver(
    s: &Services<'_>,
    cx: &Context<'_>,
    parsed: &ParsedMessage<'_>,
    verdict: &mut Verdict,
    relay: &mut Relay,
) -> Reply {
    let mut headers = std::mem::take(&mut verdict.headers);
    if !relay.sees_real_client() {
        headers.insert(0, received_header(s, cx));
    }
    let envelope = Envelope {
        from: cx.mail_from,
        rcpts: cx.rcpts,
    };
    let parts = crate::relay::writer::edited(parsed.bytes, &verdict.edits);
    if cx.role == Role::Submission
        && let Some(signer) = s.signer
    {
        // After the From check, the outbound stage and the rules: what is signed is
        // exactly what is relayed.
        let signing = crate::signing::record(signer.sign(&headers, &parts));
        verdict.dkim = signing.summary();
        headers.splice(0..0, signing.headers().iter().cloned());
    }
    let started = std::time::Instant::now();
    let delivered = relay.deliver(&envelope, &headers, &parts).await;
    verdict.headers = headers;
    crate::metrics::global()
        .next_hop_seconds
        .observe(started.elapsed().as_secs_f64());
    match delivered {
        Ok(reply) => reply,
        Err(e) => crate::relay::failure::report(&e, Stage::EndOfData, cx.session_id),
    }
}

/// Puts the message in quarantine. 250 only once it is on disk durably; any failure
/// (no store, disk full, read-only) is a 4xx and the client keeps the message.
async fn hold(
    s: &Services<'_>,
    cx: &Context<'_>,
    parsed: &ParsedMessage<'_>,
    verdict: &Verdict,
) -> Reply {
    let Some(store) = s.quarantine else {
        tracing::error!(session = %cx.session_id, "quarantine verdict but no quarantine store");
        return Reply::temp_local_problem();
    };
    let header = |name: &str| parsed.first(name).unwrap_or_default().to_string();
    let meta = Meta {
        id: String::new(),
        received_at: std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_secs()),
        session: cx.session_id.to_string(),
        listener: role_name(cx.role),
        client: cx.client.to_string(),
        helo: cx.helo.to_string(),
        login: cx.login.map(str::to_string),
        mail_from: cx.mail_from.address.clone(),
        rcpts: cx.rcpts.iter().map(|r| r.address.clone()).collect(),
        header_from: header("From"),
        subject: header("Subject"),
        size: parsed.bytes.len(),
        authentication_results: verdict.authentication_results.clone().unwrap_or_default(),
        flags: verdict.flags.clone(),
        verdict: "quarantine".into(),
        reasons: verdict.reasons.clone(),
        state: crate::quarantine::State::Held,
        instance: String::new(),
    };
    match store.store(meta, parsed.bytes.to_vec()).await {
        Ok(id) => {
            let m = crate::metrics::global();
            m.quarantined.inc();
            m.quarantine_held.inc();
            crate::quarantine::export_usage(store.as_ref()).await;
            Reply::queued(id)
        }
        Err(StoreError::Full(refusal)) => {
            // No room (capacity, or this sender domain's share): the client keeps the
            // message and retries; nothing is lost (RFC 3463 4.3.1).
            tracing::info!(session = %cx.session_id, reason = refusal.kind(), detail = %refusal, "quarantine: no room, message deferred");
            crate::metrics::global()
                .quarantine_refused
                .get_or_create(&crate::metrics::label("reason", refusal.kind()))
                .inc();
            store.alert_full(
                &refusal,
                crate::config::defaults::QUARANTINE_FULL_ALERT_INTERVAL,
            );
            Reply::quarantine_full()
        }
        Err(e @ (StoreError::Database(_) | StoreError::Exists(_))) => {
            // The shared store (PostgreSQL) is unreachable, slow past its budget, or
            // refused the write: nothing was acknowledged, the client keeps the
            // message and retries (RFC 3463 4.3.0, other mail system problem).
            tracing::error!(session = %cx.session_id, error = %e, "quarantine write failed");
            Reply::temp_local_problem()
        }
        Err(e) => {
            // Disk full or not writable: the client keeps the message and retries
            // (RFC 3463 4.3.1, insufficient system storage).
            tracing::error!(session = %cx.session_id, error = %e, "quarantine write failed");
            Reply::storage_full()
        }
    }
}

/// `inbound` | `submission`, as the quarantine entry and the decision log write it.
pub(super) fn role_name(role: Role) -> String {
    format!("{role:?}").to_lowercase()
}

/// Our own `Received:` line, for a next hop that does not learn the real client.
fn received_header(s: &Services<'_>, cx: &Context<'_>) -> String {
    let protocol = match (cx.esmtp, cx.tls) {
        (true, true) => "ESMTPS",
        (true, false) => "ESMTP",
        (false, true) => "SMTPS",
        (false, false) => "SMTP",
    };
    let single = (cx.rcpts.len() == 1).then(|| cx.rcpts[0].address.as_str());
    trace::received_header(
        cx.helo,
        cx.client.ip(),
        &s.config.hostname,
        protocol,
        cx.session_id,
        single,
    )
}
