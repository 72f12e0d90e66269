//! The decision log: for every transaction that reached the outbound stage's decision
//! or the policy stage, what the policy saw (exactly [`PolicyInputs`], the outbound
//! findings included) and what the pipeline decided (`crate::pipeline::record` writes
//! it from the one `Verdict`), so a changed policy can be replayed over past mail
//! ([`replay`]).
//!
//! Sessions hand records to one writer thread over a bounded channel and never wait:
//! with the channel full a record is dropped, counted
//! (`mailwarden_decision_log_dropped`) and logged. The store is behind
//! [`store::DecisionStore`] so it can live elsewhere (PostgreSQL) later; the embedded
//! one is append-only JSON lines under `var/` ([`store::FileStore`]).

pub mod replay;
pub mod store;
pub mod where_policy;

use std::sync::atomic::{AtomicU64, Ordering};

use tokio::sync::mpsc::{Receiver, Sender, channel, error::TrySendError};

use serde::{Deserialize, Serialize};

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
    /// SHA-256 of the message as received (hex): the body itself is never logged.
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

/// SHA-256 of `message`, hex (aws-lc-rs: the crypto stack already in use).
pub fn digest(message: &[u8]) -> String {
    use std::fmt::Write;
    let d = aws_lc_rs::digest::digest(&aws_lc_rs::digest::SHA256, message);
    d.as_ref()
        .iter()
        .fold(String::with_capacity(64), |mut s, b| {
            let _ = write!(s, "{b:02x}");
            s
        })
}

/// Most records written (and flushed) at once.
const BATCH: usize = 512;
/// At most one "records dropped" warning per this many milliseconds.
const DROP_WARN_INTERVAL_MS: u64 = 10_000;

/// The sessions' handle on the writer thread.
pub struct DecisionLog {
    /// `None` only while dropping.
    tx: Option<Sender<Record>>,
    writer: Option<std::thread::JoinHandle<()>>,
    last_warning: AtomicU64,
}

/// The last holder (the server, once sessions are done) waits for the queue to be
/// written, so a clean shutdown loses no record.
impl Drop for DecisionLog {
    fn drop(&mut self) {
        drop(self.tx.take());
        if let Some(writer) = self.writer.take() {
            let _ = writer.join();
        }
    }
}

impl DecisionLog {
    /// Starts the writer thread over `store`, with `capacity` records of queue.
    ///
    /// The queue is Tokio's bounded channel, not `std::sync::mpsc::sync_channel`: the
    /// std one allocates and writes all `capacity` slots up front, and a `Record` is
    /// about 1 KB, so the default 10,000 slots cost 10 MB of resident memory from the
    /// start, two thirds of the proxy's anonymous memory at C=50 (issue 18). Tokio's
    /// allocates blocks of 32 slots as records wait, and reuses or frees them once
    /// written. Same bound, same never-waiting `try_send`; the writer thread blocks in
    /// `blocking_recv`.
    pub fn start(
        mut store: Box<dyn DecisionStore>,
        capacity: usize,
    ) -> std::io::Result<DecisionLog> {
        let (tx, rx) = channel(capacity);
        let writer = std::thread::Builder::new()
            .name("decision-log".into())
            .spawn(move || write_loop(&mut *store, rx))?;
        Ok(DecisionLog {
            tx: Some(tx),
            writer: Some(writer),
            last_warning: AtomicU64::new(0),
        })
    }

    /// Queues one record; never blocks. A full queue drops it (counted, logged).
    pub fn record(&self, record: Record) {
        let Some(tx) = &self.tx else { return };
        match tx.try_send(record) {
            Ok(()) => {}
            Err(TrySendError::Full(_)) | Err(TrySendError::Closed(_)) => {
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
    }
}

fn write_loop(store: &mut dyn DecisionStore, mut rx: Receiver<Record>) {
    while let Some(first) = rx.blocking_recv() {
        let mut batch = vec![first];
        while batch.len() < BATCH {
            match rx.try_recv() {
                Ok(r) => batch.push(r),
                Err(_) => break,
            }
        }
        if let Err(e) = store.append(&batch) {
            crate::metrics::global()
                .decision_log_dropped
                .inc_by(batch.len() as u64);
            tracing::error!(error = %e, lost = batch.len(), "decision log: records not written");
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
    fn digest_is_sha256_hex() {
        assert_eq!(
            digest(b"abc"),
            "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"
        );
    }
}
