//! DATA: read the message and hand it to the decision pipeline (`crate::pipeline`),
//! which decides and carries the verdict out; then give the client its reply and write
//! the transaction's log line. Every decision is made in the pipeline. A 250 goes out
//! only when the next hop said 2xx or the quarantine has the message durably.

use crate::pipeline::{self, Context, Services, Verdict};
use crate::smtp::session::{Flow, Helo, Session, State, Transaction};
use crate::wire::codec::{DataStats, ReadError};
use crate::wire::memory::Reservation;
use crate::wire::reply::Reply;

impl Session {
    pub(crate) async fn on_data(&mut self, state: State) -> (State, Flow) {
        let State::Transaction(helo, tx) = state else {
            let reply = Reply::need_mail();
            return (state, self.error(reply).await);
        };
        if tx.rcpts.is_empty() {
            // As Postfix: no RCPT at all is out of sequence; all of them refused is 554.
            let reply = if tx.rcpt_attempts == 0 {
                Reply::need_rcpt()
            } else {
                Reply::no_valid_recipients()
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
                    self.say_goodbye(Reply::timeout()).await;
                }
                return (State::Ready(helo), Flow::Close);
            }
        };
        let (verdict, reply) = self.decide(&helo, &tx, &message, &stats).await;
        let result = match reply.code {
            200..=299 => "accepted",
            400..=499 => "deferred",
            _ => "refused",
        };
        crate::metrics::global()
            .transactions
            .get_or_create(&crate::metrics::label("outcome", result))
            .inc();
        self.log_transaction(&helo, &tx, &stats, &verdict, &reply);
        let flow = if reply.closes_session() {
            self.say_goodbye(reply).await;
            Flow::Close
        } else {
            self.stream.queue(&reply);
            Flow::Continue
        };
        (State::Ready(helo), flow)
    }

    /// Hands the message to the decision pipeline, which decides and carries the
    /// verdict out (relay, quarantine, refusal) with this session's next-hop link.
    async fn decide(
        &mut self,
        helo: &Helo,
        tx: &Transaction,
        message: &[u8],
        stats: &DataStats,
    ) -> (Verdict, Reply) {
        let shared = self.shared.clone();
        let services = Services {
            config: &shared.config,
            inspector: shared.inspector.as_ref(),
            outbound: shared.outbound.as_deref(),
            quarantine: shared.quarantine.as_ref(),
            signer: shared.signer.as_deref(),
            dmarc_reports: shared.dmarc_reports.as_deref(),
            decision_log: shared.decision_log.as_deref(),
            memory: &shared.memory,
        };
        let cx = Context {
            session_id: &self.id,
            client: self.peer,
            helo: &helo.name,
            esmtp: helo.esmtp,
            tls: self.is_tls(),
            role: self.listener.config.role,
            login: self.login.as_deref(),
            mail_from: &tx.from,
            rcpts: &tx.rcpts,
            rcpt_refused: tx.rcpt_refused,
        };
        pipeline::run(&services, &cx, message, stats, &mut self.relay).await
    }

    /// The one log line per transaction.
    fn log_transaction(
        &self,
        helo: &Helo,
        tx: &Transaction,
        stats: &DataStats,
        verdict: &Verdict,
        reply: &Reply,
    ) {
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
            next_hop_reply = %reply.summary(),
            verdict = verdict.name(),
            reasons = %verdict.reasons.join(","),
            dkim_sign = %verdict.dkim,
            duration_ms = tx.started.elapsed().as_millis() as u64,
            "transaction"
        );
    }
}
