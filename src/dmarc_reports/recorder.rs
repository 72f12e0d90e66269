//! Hands evaluations from the sessions to one writer thread over a bounded channel. A
//! session never waits: when the channel is full the evaluation is dropped and counted
//! (`mailwarden_dmarc_records_dropped`), so a slow disk can cost report accuracy, never
//! mail.

use tokio::sync::mpsc::{Receiver, Sender, channel, error::TrySendError};

use super::Evaluation;
use super::store::ReportStore;

/// Most evaluations written in one SQLite transaction.
const BATCH: usize = 512;

pub struct Recorder {
    /// `None` only while dropping.
    tx: Option<Sender<Evaluation>>,
    writer: Option<std::thread::JoinHandle<()>>,
    opt_out: Vec<String>,
}

/// The last holder (the server, once sessions are done) waits for what is queued to be
/// written, so a clean shutdown loses no evaluation.
impl Drop for Recorder {
    fn drop(&mut self) {
        drop(self.tx.take());
        if let Some(writer) = self.writer.take() {
            let _ = writer.join();
        }
    }
}

impl Recorder {
    /// Starts the writer thread over `store`. It ends when the recorder is dropped,
    /// after writing what was queued.
    pub fn start(
        mut store: Box<dyn ReportStore>,
        capacity: usize,
        opt_out: Vec<String>,
    ) -> std::io::Result<Recorder> {
        // Tokio's bounded channel allocates as evaluations wait, where std's
        // `sync_channel` would write all `capacity` slots at the start (see
        // `crate::decision_log::DecisionLog::start`).
        let (tx, rx) = channel(capacity);
        let writer = std::thread::Builder::new()
            .name("dmarc-records".into())
            .spawn(move || write_loop(&mut *store, rx))?;
        Ok(Recorder {
            tx: Some(tx),
            writer: Some(writer),
            opt_out,
        })
    }

    /// Queues one evaluation (never blocks). Opted-out domains are not recorded at all.
    pub fn record(&self, evaluation: Evaluation) {
        let domain = evaluation.published.domain.trim_end_matches('.');
        if self
            .opt_out
            .iter()
            .any(|d| d.trim_end_matches('.').eq_ignore_ascii_case(domain))
        {
            return;
        }
        let Some(tx) = &self.tx else {
            return;
        };
        match tx.try_send(evaluation) {
            Ok(()) => {}
            Err(TrySendError::Full(_)) | Err(TrySendError::Closed(_)) => {
                crate::metrics::global().dmarc_records_dropped.inc();
            }
        }
    }
}

fn write_loop(store: &mut dyn ReportStore, mut rx: Receiver<Evaluation>) {
    while let Some(first) = rx.blocking_recv() {
        let mut batch = vec![first];
        while batch.len() < BATCH {
            match rx.try_recv() {
                Ok(e) => batch.push(e),
                Err(_) => break,
            }
        }
        if let Err(e) = store.record(&batch) {
            crate::metrics::global()
                .dmarc_records_dropped
                .inc_by(batch.len() as u64);
            tracing::error!(error = %e, lost = batch.len(), "DMARC evaluations not recorded");
        }
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use crate::dmarc_reports::store::{NewReport, ReportState, StoredReport};
    use std::sync::{Arc, Mutex};

    /// A store whose writes announce themselves, then block until the test opens the gate.
    struct Gated {
        gate: Arc<Mutex<()>>,
        entered: std::sync::mpsc::Sender<()>,
    }

    type R<T> = crate::dmarc_reports::store::Result<T>;

    impl ReportStore for Gated {
        fn record(&mut self, _: &[Evaluation]) -> R<()> {
            let _ = self.entered.send(());
            let _open = self.gate.lock().unwrap();
            Ok(())
        }
        fn period_mark(&self) -> R<Option<u64>> {
            Ok(None)
        }
        fn evaluations_before(&self, _: u64) -> R<Vec<Evaluation>> {
            Ok(vec![])
        }
        fn close_period(&mut self, _: Option<u64>, _: u64, _: &[NewReport]) -> R<bool> {
            Ok(false)
        }
        fn list(&self) -> R<Vec<StoredReport>> {
            Ok(vec![])
        }
        fn get(&self, _: &str) -> R<Option<StoredReport>> {
            Ok(None)
        }
        fn due(&self, _: u64) -> R<Vec<StoredReport>> {
            Ok(vec![])
        }
        fn transition(&mut self, _: &str, _: ReportState, _: ReportState, _: u64) -> R<bool> {
            Ok(false)
        }
        fn settle(&mut self, _: &str, _: ReportState, _: u64, _: &str, _: &str, _: u64) -> R<()> {
            Ok(())
        }
        fn abandon_stale(&mut self, _: u64) -> R<usize> {
            Ok(0)
        }
    }

    pub fn sample(domain: &str) -> Evaluation {
        serde_json::from_value(serde_json::json!({
            "at": 10, "source_ip": "192.0.2.7", "header_from": domain, "envelope_from": domain,
            "envelope_to": "local.test",
            "published": {"domain": domain, "adkim": "r", "aspf": "r", "p": "reject", "sp": "reject",
                          "pct": 100, "fo": "0", "rua": format!("mailto:d@{domain}")},
            "spf_domain": domain, "spf_scope": "mfrom", "spf_result": "pass",
            "dkim": [], "spf_aligned": true, "dkim_aligned": false, "dmarc_result": "pass",
            "applied_policy": "reject", "disposition": "none", "overrides": []
        }))
        .unwrap()
    }

    #[test]
    fn a_full_queue_drops_and_counts_instead_of_waiting() {
        let gate = Arc::new(Mutex::new(()));
        let closed = gate.lock().unwrap();
        let (entered, writer_busy) = std::sync::mpsc::channel();
        let store = Gated {
            gate: gate.clone(),
            entered,
        };
        let recorder = Recorder::start(Box::new(store), 1, vec!["quiet.example".into()]).unwrap();
        recorder.record(sample("a.example"));
        // The writer now holds that one and is stuck in the store: the queue (1) fills
        // with the next, and the 9 after it must be dropped, not waited for.
        writer_busy.recv().unwrap();
        let before = crate::metrics::global().dmarc_records_dropped.get();
        for _ in 0..10 {
            recorder.record(sample("a.example"));
        }
        assert_eq!(
            crate::metrics::global().dmarc_records_dropped.get() - before,
            9
        );
        // Opted-out domains are never queued (so never counted as dropped either).
        recorder.record(sample("QUIET.example."));
        assert_eq!(
            crate::metrics::global().dmarc_records_dropped.get() - before,
            9
        );
        drop(closed);
        drop(recorder);
    }

    #[test]
    fn dropping_the_recorder_writes_what_is_queued() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("r.sqlite");
        let store = crate::dmarc_reports::SqliteStore::open(&path).unwrap();
        let recorder = Recorder::start(Box::new(store), 1000, vec![]).unwrap();
        for _ in 0..600 {
            recorder.record(sample("a.example"));
        }
        drop(recorder);
        let check = crate::dmarc_reports::SqliteStore::open(&path).unwrap();
        assert_eq!(
            check.evaluations_before(u32::MAX as u64).unwrap().len(),
            600
        );
    }
}
