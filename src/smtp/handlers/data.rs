//! DATA: read the message, run the checks and the verdict hook, relay, and give the
//! client the next hop's answer. A 250 goes out only when the next hop said 2xx.

use super::decision_log::Decided;
use crate::config::BareLf;
use crate::policy::{Action, Decision, MessageContext};
use crate::quarantine::{Meta, StoreError};
use crate::relay::Envelope;
use crate::smtp::session::{Flow, Helo, Session, State, Transaction};
use crate::wire::codec::{DataStats, ReadError};
use crate::wire::memory::Reservation;
use crate::wire::reply::{Enhanced, Reply};
use crate::wire::trace;

/// How a message ended, for the transaction log line.
struct Outcome {
    reply: Reply,
    verdict: &'static str,
    reasons: Vec<String>,
    /// Outbound DKIM signing, for the log line ("" when not a signing listener).
    dkim: String,
}

impl Session {
    pub(crate) async fn on_data(&mut self, state: State) -> (State, Flow) {
        let State::Transaction(helo, tx) = state else {
            let reply = Reply::new(503, Enhanced(5, 5, 1), "Need MAIL command");
            return (state, self.error(reply).await);
        };
        if tx.rcpts.is_empty() {
            // As Postfix: no RCPT at all is out of sequence; all of them refused is 554.
            let reply = if tx.rcpt_attempts == 0 {
                Reply::new(503, Enhanced(5, 5, 1), "Need RCPT command")
            } else {
                Reply::new(554, Enhanced(5, 5, 1), "No valid recipients")
            };
            return (State::Transaction(helo, tx), self.error(reply).await);
        }
        if let Some(failure) = tx.relay_failure.clone() {
            self.relay.reset().await;
            return (State::Ready(helo), self.error(failure).await);
        }
        self.stream.queue(&Reply::plain(
            354,
            vec!["End data with <CR><LF>.<CR><LF>".into()],
        ));
        let limits = &self.config().limits;
        let (limit, timeout) = (limits.message_size_limit, limits.data_timeout);
        // SIZE is the client's word: it sizes the first allocation, up to 1 MiB only.
        let first_allocation = tx.from.size.clamp(4096, limit.clamp(4096, 1 << 20));
        let mut message = Vec::with_capacity(first_allocation);
        // Held until the message is relayed or quarantined (the end of this function).
        let mut memory = Reservation::new(&self.shared.memory);
        let read = self
            .stream
            .read_data(&mut message, limit, timeout, &mut memory)
            .await;
        let stats = match read {
            Ok(stats) => stats,
            Err(e) => {
                tracing::info!(session = %self.id, client = %self.peer, error = %e, "client lost during DATA");
                self.relay.close().await;
                if matches!(e, ReadError::Timeout) {
                    self.say_goodbye(Reply::new(
                        421,
                        Enhanced(4, 4, 2),
                        "Timeout, closing connection",
                    ))
                    .await;
                }
                return (State::Ready(helo), Flow::Close);
            }
        };
        let outcome = self.settle(&helo, &tx, &message, &stats).await;
        let result = match outcome.reply.code {
            200..=299 => "accepted",
            400..=499 => "deferred",
            _ => "refused",
        };
        crate::metrics::global()
            .transactions
            .get_or_create(&crate::metrics::label("outcome", result))
            .inc();
        self.log_transaction(&helo, &tx, &stats, &outcome);
        let flow = if outcome.reply.closes_session() {
            self.say_goodbye(outcome.reply).await;
            Flow::Close
        } else {
            self.stream.queue(&outcome.reply);
            Flow::Continue
        };
        (State::Ready(helo), flow)
    }

    /// Decides and, when the verdict allows, relays. Every path returns the reply.
    async fn settle(
        &mut self,
        helo: &Helo,
        tx: &Transaction,
        message: &[u8],
        stats: &DataStats,
    ) -> Outcome {
        let limits = &self.shared.config.limits;
        let refusal = if stats.too_big {
            Some(Reply::new(
                552,
                Enhanced(5, 3, 4),
                "Message size exceeds fixed limit",
            ))
        } else if stats.over_budget {
            tracing::warn!(session = %self.id, size = stats.size, in_use = self.shared.memory.in_use(),
                "message memory budget ([limits] message_memory) full: message deferred");
            Some(Reply::new(
                452,
                Enhanced(4, 3, 1),
                "Insufficient system resources, try again later",
            ))
        } else if stats.bare_lf > 0 && limits.bare_lf == BareLf::Reject {
            Some(Reply::new(
                554,
                Enhanced(5, 5, 2),
                "Bare <LF> line endings are not allowed (RFC 5321 section 2.3.8)",
            ))
        } else if trace::count_received(message) > limits.max_received_headers {
            Some(Reply::new(
                554,
                Enhanced(5, 4, 6),
                "Too many hops, mail loop detected",
            ))
        } else {
            None
        };
        if let Some(reply) = refusal {
            self.relay.reset().await;
            return Outcome {
                reply,
                verdict: "refused",
                reasons: Vec::new(),
                dkim: String::new(),
            };
        }

        if let Some(outcome) = self.outbound_check(helo, tx, message).await {
            return outcome;
        }
        let ctx = MessageContext {
            session_id: &self.id,
            client: self.peer,
            helo: &helo.name,
            role: self.listener.config.role,
            tls: self.is_tls(),
            mail_from: &tx.from,
            rcpts: &tx.rcpts,
            message,
        };
        let decision = self.shared.inspector.inspect(&ctx).await;
        let verdict = decision.action.name();
        let mut dkim = String::new();
        let reply = match &decision.action {
            Action::Reject(reply) | Action::Defer(reply) => {
                self.relay.reset().await;
                reply.clone()
            }
            Action::Quarantine => {
                self.relay.reset().await;
                self.hold(helo, tx, message, &decision).await
            }
            Action::Accept | Action::Tag => {
                let mut headers = decision.headers.clone();
                if !self.relay.sees_real_client() {
                    headers.insert(0, self.received_header(helo, tx));
                }
                let envelope = Envelope {
                    from: &tx.from,
                    rcpts: &tx.rcpts,
                };
                let parts = crate::relay::writer::edited(message, &decision.edits);
                if self.listener.config.role == crate::config::Role::Submission
                    && let Some(signer) = &self.shared.signer
                {
                    // After the From check, the burst stage and the verdict: what is
                    // signed is exactly what is relayed.
                    let signing = crate::signing::record(signer.sign(&headers, &parts));
                    dkim = signing.summary();
                    headers.splice(0..0, signing.headers().iter().cloned());
                }
                let started = std::time::Instant::now();
                let delivered = self.relay.deliver(&envelope, &headers, &parts).await;
                crate::metrics::global()
                    .next_hop_seconds
                    .observe(started.elapsed().as_secs_f64());
                match delivered {
                    Ok(reply) => reply,
                    Err(e) => {
                        crate::metrics::global()
                            .next_hop_errors
                            .get_or_create(&crate::metrics::label("kind", e.kind()))
                            .inc();
                        tracing::warn!(session = %self.id, error = %e, "next hop failed at end of data");
                        e.reply()
                    }
                }
            }
        };
        self.record_dmarc(tx, &decision, &reply);
        self.log_decision(helo, tx, message, Decided::Policy(&decision), &reply);
        Outcome {
            reply,
            verdict,
            reasons: decision.reasons.clone(),
            dkim,
        }
    }

    /// Outbound burst detection (submission listeners): counts the message for its
    /// account and applies the detector's action. `None` means go on as usual.
    async fn outbound_check(
        &mut self,
        helo: &Helo,
        tx: &Transaction,
        message: &[u8],
    ) -> Option<Outcome> {
        use crate::outbound::OutboundAction;
        if self.listener.config.role != crate::config::Role::Submission {
            return None;
        }
        let detector = self.shared.outbound.clone()?;
        let account = detector.account(self.login.as_deref(), self.peer.ip(), &tx.from.address)?;
        // Without AUTH the envelope sender is whatever the client says: the client itself
        // is counted too, so that rotating MAIL FROM does not reset the limits.
        let client = detector.client_account(self.login.as_deref(), self.peer.ip());
        // The From policy covers every mailbox of every From field, and Sender: a second,
        // foreign From must not pass because only the first one was read.
        let fields = crate::auth::headers::fields(message);
        let header_from = fields
            .iter()
            .filter(|f| {
                f.name.eq_ignore_ascii_case("From") || f.name.eq_ignore_ascii_case("Sender")
            })
            .flat_map(|f| crate::policy::spoof::parse_from_mailboxes(&f.value))
            .map(|(_, address)| address)
            .filter(|a| !a.is_empty())
            .collect::<Vec<_>>()
            .join(", ");
        let rcpts: Vec<String> = tx.rcpts.iter().map(|r| r.address.clone()).collect();
        let a = detector
            .assess_as(
                &account,
                client.as_deref(),
                self.peer.ip(),
                &header_from,
                &rcpts,
                tx.rcpt_refused,
            )
            .await;
        let held = a.frozen
            || matches!(
                a.action,
                Some(OutboundAction::Hold | OutboundAction::Freeze)
            );
        let reply = if held {
            let decision = Decision {
                action: Action::Quarantine,
                headers: Vec::new(),
                edits: Vec::new(),
                reasons: a.reasons.clone(),
                flags: a.flags.iter().map(|f| f.to_string()).collect(),
                authentication_results: None,
                auth: None,
                explained: None,
            };
            self.relay.reset().await;
            tracing::warn!(session = %self.id, account = %account, frozen = a.frozen, reasons = %a.reasons.join("; "), "outbound: message held");
            self.hold(helo, tx, message, &decision).await
        } else {
            match a.action {
                Some(OutboundAction::Reject) if a.flags.contains(&crate::outbound::FLAG_FROM) => {
                    Reply::new(
                        550,
                        Enhanced(5, 7, 1),
                        "From address not permitted for this account",
                    )
                }
                Some(OutboundAction::Reject) => Reply::new(
                    550,
                    Enhanced(5, 7, 1),
                    "Sending limit exceeded for this account",
                ),
                Some(OutboundAction::Defer) => Reply::new(
                    451,
                    Enhanced(4, 7, 1),
                    "Sending rate exceeded, try again later",
                ),
                _ => return None,
            }
        };
        if !held {
            self.relay.reset().await;
        }
        let decided = Decided::Outbound {
            account: &account,
            assessment: &a,
        };
        self.log_decision(helo, tx, message, decided, &reply);
        let verdict = if held {
            "hold"
        } else {
            a.action.map_or("accept", |x| x.as_str())
        };
        Some(Outcome {
            reply,
            verdict,
            reasons: a.reasons,
            dkim: String::new(),
        })
    }

    /// Puts the message in quarantine. 250 only once it is on disk durably; any
    /// failure (no store, disk full, read-only) is a 451 and the client keeps the message.
    async fn hold(
        &self,
        helo: &Helo,
        tx: &Transaction,
        message: &[u8],
        decision: &Decision,
    ) -> Reply {
        let Some(store) = self.shared.quarantine.clone() else {
            tracing::error!(session = %self.id, "quarantine verdict but no quarantine store");
            return Reply::new(
                451,
                Enhanced(4, 3, 0),
                "Temporary local problem, try again later",
            );
        };
        let fields = crate::auth::headers::fields(message);
        let header = |name: &str| {
            crate::auth::headers::first(&fields, name)
                .map(|f| f.value.clone())
                .unwrap_or_default()
        };
        let meta = Meta {
            id: String::new(),
            received_at: std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map_or(0, |d| d.as_secs()),
            session: self.id.clone(),
            listener: format!("{:?}", self.listener.config.role).to_lowercase(),
            client: self.peer.to_string(),
            helo: helo.name.clone(),
            login: self.login.clone(),
            mail_from: tx.from.address.clone(),
            rcpts: tx.rcpts.iter().map(|r| r.address.clone()).collect(),
            header_from: header("From"),
            subject: header("Subject"),
            size: message.len(),
            authentication_results: decision.authentication_results.clone().unwrap_or_default(),
            flags: decision.flags.clone(),
            verdict: "quarantine".into(),
            reasons: decision.reasons.clone(),
            state: crate::quarantine::State::Held,
            instance: String::new(),
        };
        match store.store(meta, message.to_vec()).await {
            Ok(id) => {
                let m = crate::metrics::global();
                m.quarantined.inc();
                m.quarantine_held.inc();
                crate::quarantine::export_usage(store.as_ref()).await;
                Reply::new(250, Enhanced(2, 0, 0), format!("Ok: queued as {id}"))
            }
            Err(StoreError::Full(refusal)) => {
                // No room (capacity, or this sender domain's share): the client keeps
                // the message and retries; nothing is lost (RFC 3463 4.3.1).
                tracing::info!(session = %self.id, reason = refusal.kind(), detail = %refusal, "quarantine: no room, message deferred");
                crate::metrics::global()
                    .quarantine_refused
                    .get_or_create(&crate::metrics::label("reason", refusal.kind()))
                    .inc();
                store.alert_full(
                    &refusal,
                    crate::config::defaults::QUARANTINE_FULL_ALERT_INTERVAL,
                );
                Reply::new(
                    451,
                    Enhanced(4, 3, 1),
                    "Insufficient system storage, try again later",
                )
            }
            Err(e @ (StoreError::Database(_) | StoreError::Exists(_))) => {
                // The shared store (PostgreSQL) is unreachable, slow past its budget, or
                // refused the write: nothing was acknowledged, the client keeps the
                // message and retries (RFC 3463 4.3.0, other mail system problem).
                tracing::error!(session = %self.id, error = %e, "quarantine write failed");
                Reply::new(
                    451,
                    Enhanced(4, 3, 0),
                    "Temporary local problem, try again later",
                )
            }
            Err(e) => {
                // Disk full or not writable: the client keeps the message and retries
                // (RFC 3463 4.3.1, insufficient system storage).
                tracing::error!(session = %self.id, error = %e, "quarantine write failed");
                Reply::new(
                    452,
                    Enhanced(4, 3, 1),
                    "Insufficient system storage, try again later",
                )
            }
        }
    }

    fn received_header(&self, helo: &Helo, tx: &Transaction) -> String {
        let protocol = match (helo.esmtp, self.is_tls()) {
            (true, true) => "ESMTPS",
            (true, false) => "ESMTP",
            (false, true) => "SMTPS",
            (false, false) => "SMTP",
        };
        let single = (tx.rcpts.len() == 1).then(|| tx.rcpts[0].address.as_str());
        trace::received_header(
            &helo.name,
            self.peer.ip(),
            &self.config().hostname,
            protocol,
            &self.id,
            single,
        )
    }

    /// The one log line per transaction.
    fn log_transaction(&self, helo: &Helo, tx: &Transaction, stats: &DataStats, outcome: &Outcome) {
        let rcpts: Vec<&str> = tx.rcpts.iter().map(|r| r.address.as_str()).collect();
        tracing::info!(
            session = %self.id,
            client = %self.peer,
            helo = %helo.name,
            from = %tx.from.address,
            rcpts = %rcpts.join(","),
            size = stats.size,
            bare_lf = stats.bare_lf,
            bare_cr = stats.bare_cr,
            long_lines = stats.long_lines,
            next_hop_reply = %outcome.reply.summary(),
            verdict = outcome.verdict,
            reasons = %outcome.reasons.join(","),
            dkim_sign = %outcome.dkim,
            duration_ms = tx.started.elapsed().as_millis() as u64,
            "transaction"
        );
    }
}
