//! The decision log: for every transaction that reached the outbound stage's decision
//! or the policy stage, what the policy saw (exactly [`PolicyInputs`], the outbound
//! findings included) and what the pipeline decided (`crate::pipeline::record` writes
//! it from the one `Verdict`), so a changed policy can be replayed over past mail
//! ([`replay`]).
//!
//! Sessions hand records to one writer thread ([`crate::batch_writer`]) and never wait:
//! with the channel full a record is dropped, counted
//! (`mailwarden_decision_log_dropped`) and logged. The store is behind
//! [`store::DecisionStore`] so it can live elsewhere (PostgreSQL) later; the embedded
//! one is append-only JSON lines under `var/` ([`store::FileStore`]).

pub mod replay;
pub mod store;
pub mod where_policy;

use std::sync::atomic::{AtomicU64, Ordering};

use serde::{Deserialize, Serialize};

use crate::batch_writer::BatchWriter;
use crate::policy::inputs::PolicyInputs;
use crate::policy::rules::ActionKind;
/// The compact trace kept in the log (the policy owns its spelling).
pub use crate::policy::rules::compact_trace;
use store::DecisionStore;

/// Which stage of the pipeline (`crate::pipeline`) decided.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Stage {
    /// The outbound burst detector held, refused or deferred the message before the
    /// policy ran: a policy file cannot change that.
    Outbound,
    /// The policy's rules (header sanity, authentication, spoof flags, rules).
    Policy,
}

/// What the outbound stage found, whenever it ran: when it decided alone
/// ([`Stage::Outbound`]) and when it let the message through to the rules.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct OutboundStage {
    pub account: String,
    /// The detector's action: `none` | `alert` (let through), `hold` | `reject` |
    /// `defer` | `freeze` (decided; `none` or `alert` with `frozen` too).
    pub action: String,
    pub frozen: bool,
    #[serde(default)]
    pub flags: Vec<String>,
    #[serde(default)]
    pub reasons: Vec<String>,
    /// The counters the detector's limits read, per key (`messages_1m`, `domains_1h`,
    /// `baseline_messages` …), whatever it decided: why a burst was or was not one.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub counts: Vec<LoggedCount>,
}

/// One counter of [`OutboundStage::counts`].
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct LoggedCount {
    /// The account, or the client key.
    pub key: String,
    pub name: String,
    pub value: f64,
}

/// The header fields rules read, and the Message-ID to find the message again.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct LoggedHeaders {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub from: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub list_id: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub message_id: Option<String>,
}

/// One transaction: one JSON line in the log.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Record {
    /// When it was decided, Unix time in milliseconds.
    pub t: u64,
    pub session: String,
    /// `inbound` | `submission`.
    pub listener: String,
    pub client: String,
    pub helo: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub login: Option<String>,
    pub mail_from: String,
    pub rcpts: Vec<String>,
    #[serde(default)]
    pub headers: LoggedHeaders,
    /// `blake3:` and the BLAKE3 hash of the message as received (64 hex digits; `b3sum`
    /// computes it from the message's CRLF bytes): the body itself is never logged.
    pub digest: String,
    pub size: usize,
    pub stage: Stage,
    /// What the rules read (policy stage).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub inputs: Option<PolicyInputs>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub outbound: Option<OutboundStage>,
    /// The action decided (an outbound hold is `quarantine`).
    pub action: ActionKind,
    /// The deciding rule (`outbound` for the outbound stage).
    pub rule: String,
    /// `rule=action` for matched rules, `rule=no` for the others, in order.
    #[serde(default)]
    pub trace: Vec<String>,
    /// The reply code the client got.
    pub reply: u16,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub quarantine_id: Option<String>,
}

/// Milliseconds since the Unix epoch.
pub fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

/// The message's digest for the log: `blake3:` and 64 hex digits.
///
/// BLAKE3 rather than SHA-256 (issue 18): it is computed for every message, and on this
/// machine's AVX-512 cores it hashes 100 KB in about 14 µs against SHA-256's 53 µs (SHA
/// extensions included), which was an eighth of the CPU a 100 KB message cost. It is as
/// much a cryptographic hash as SHA-256 for what the field is for (finding the decision
/// about a message one holds, never proving anything), and `b3sum` is in Debian.
pub fn digest(message: &[u8]) -> String {
    format!("blake3:{}", blake3::hash(message).to_hex())
}

/// Most records written (and flushed) at once.
const BATCH: usize = 512;
/// At most one "records dropped" warning per this many milliseconds.
const DROP_WARN_INTERVAL_MS: u64 = 10_000;

/// The sessions' handle on the writer thread.
pub struct DecisionLog {
    writer: BatchWriter<Record>,
    last_warning: AtomicU64,
}

impl DecisionLog {
    /// Starts the writer thread over `store`, with `capacity` records of queue. Dropping
    /// the log (the server, once sessions are done) writes what is queued first, so a
    /// clean shutdown loses no record.
    pub fn start(
        mut store: Box<dyn DecisionStore>,
        capacity: usize,
    ) -> std::io::Result<DecisionLog> {
        let writer = BatchWriter::start("decision-log", capacity, BATCH, move |batch| {
            if let Err(e) = store.append(&batch) {
                crate::metrics::global()
                    .decision_log_dropped
                    .inc_by(batch.len() as u64);
                tracing::error!(error = %e, lost = batch.len(), "decision log: records not written");
            }
        })?;
        Ok(DecisionLog {
            writer,
            last_warning: AtomicU64::new(0),
        })
    }

    /// Queues one record; never blocks. A full queue drops it (counted, logged).
    pub fn record(&self, record: Record) {
        if self.writer.try_send(record) {
            return;
        }
        crate::metrics::global().decision_log_dropped.inc();
        let now = now_ms();
        let last = self.last_warning.load(Ordering::Relaxed);
        if now.saturating_sub(last) >= DROP_WARN_INTERVAL_MS
            && self
                .last_warning
                .compare_exchange(last, now, Ordering::Relaxed, Ordering::Relaxed)
                .is_ok()
        {
            tracing::warn!(
                "decision log queue full: records dropped (see mailwarden_decision_log_dropped)"
            );
        }
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    pub fn sample(t: u64, n: usize) -> Record {
        Record {
            t,
            session: format!("s{n}"),
            listener: "inbound".into(),
            client: "192.0.2.1:4000".into(),
            helo: "mx.a.example".into(),
            login: None,
            mail_from: "a@a.example".into(),
            rcpts: vec!["u@example.org".into()],
            headers: LoggedHeaders {
                from: Some("<a@a.example>".into()),
                list_id: None,
                message_id: Some(format!("<m{n}@a.example>")),
            },
            digest: digest(b"x"),
            size: 1,
            stage: Stage::Policy,
            inputs: Some(PolicyInputs::capture(
                None,
                None,
                "192.0.2.1".parse().unwrap(),
                None,
            )),
            outbound: None,
            action: ActionKind::Accept,
            rule: "submission".into(),
            trace: vec![],
            reply: 250,
            quarantine_id: None,
        }
    }

    /// A store that blocks until the test lets it go.
    struct Gated(
        std::sync::Arc<std::sync::Mutex<()>>,
        std::sync::mpsc::Sender<()>,
    );
    impl DecisionStore for Gated {
        fn append(&mut self, _: &[Record]) -> std::io::Result<()> {
            let _ = self.1.send(());
            let _open = self.0.lock().unwrap();
            Ok(())
        }
    }

    /// A stuck store costs records, never a wait: `record` returns at once and counts.
    #[test]
    fn a_stuck_store_drops_and_counts_never_blocks() {
        let gate = std::sync::Arc::new(std::sync::Mutex::new(()));
        let held = gate.lock().unwrap();
        let (entered_tx, entered) = std::sync::mpsc::channel();
        let log = DecisionLog::start(Box::new(Gated(gate.clone(), entered_tx)), 2).unwrap();
        let before = crate::metrics::global().decision_log_dropped.get();
        log.record(sample(1, 0));
        entered.recv().unwrap(); // the writer holds record 0 inside the store
        for n in 1..=10 {
            log.record(sample(1, n)); // 2 fit in the queue, 8 are dropped
        }
        assert!(crate::metrics::global().decision_log_dropped.get() - before >= 8);
        drop(held);
        drop(log);
    }

    #[test]
    fn digest_is_blake3_hex() {
        // `printf abc | b3sum`
        assert_eq!(
            digest(b"abc"),
            "blake3:6437b3ac38465133ffb63b75273a8db548c558465d79db03fd359c6cd5bd9d85"
        );
    }
}
