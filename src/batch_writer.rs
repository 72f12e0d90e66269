//! A writer thread fed over a bounded queue and writing in batches: the decision log and
//! the DMARC evaluations both go to disk this way, so a session never waits on a disk.
//!
//! Sessions only try to queue (a full queue is the caller's to count, never a wait). The
//! thread, woken by the first item after a quiet spell, waits [`LINGER`] before it takes
//! what is queued: under load the sessions' sends then find it busy rather than parked
//! and wake nobody, so there is no futex call and no context switch per message, and one
//! write (one file append, one SQLite transaction) carries many items. The cost is that
//! an item reaches the disk up to [`LINGER`] later. Dropping the writer writes whatever is
//! queued, then ends the thread.

use std::thread::JoinHandle;
use std::time::Duration;
use tokio::sync::mpsc::{Receiver, Sender, channel, error::TrySendError};

/// How long the thread gathers items after the first one of a batch.
pub const LINGER: Duration = Duration::from_millis(10);

pub struct BatchWriter<T> {
    /// `None` only while dropping.
    tx: Option<Sender<T>>,
    thread: Option<JoinHandle<()>>,
}

impl<T: Send + 'static> BatchWriter<T> {
    /// Starts the thread `name`, with room for `capacity` queued items; `write` gets
    /// each batch (at most `max_batch` items, in the order they were queued).
    pub fn start(
        name: &str,
        capacity: usize,
        max_batch: usize,
        mut write: impl FnMut(Vec<T>) + Send + 'static,
    ) -> std::io::Result<BatchWriter<T>> {
        // Tokio's bounded channel, not `std::sync::mpsc::sync_channel`: the std one
        // allocates and writes all `capacity` slots up front (a decision-log record is
        // about 1 KB, so the default 10,000 slots were 10 MB resident from the start, two
        // thirds of the proxy's anonymous memory at C=50). Tokio's allocates blocks of 32
        // slots as items wait. Same bound; the thread blocks in `blocking_recv`.
        let (tx, mut rx) = channel(capacity.max(1));
        let thread = std::thread::Builder::new()
            .name(name.into())
            .spawn(move || {
                while let Some(batch) = next_batch(&mut rx, max_batch.max(1)) {
                    write(batch);
                }
            })?;
        Ok(BatchWriter {
            tx: Some(tx),
            thread: Some(thread),
        })
    }

    /// Queues `item` without waiting. `false` when the queue is full (or the thread has
    /// died): the item is dropped, and the caller counts it.
    pub fn try_send(&self, item: T) -> bool {
        let Some(tx) = &self.tx else { return false };
        match tx.try_send(item) {
            Ok(()) => true,
            Err(TrySendError::Full(_)) | Err(TrySendError::Closed(_)) => false,
        }
    }
}

/// Waits for an item, lingers, then takes what is queued, up to `max`. `None` once every
/// sender is gone and the queue is empty.
fn next_batch<T>(rx: &mut Receiver<T>, max: usize) -> Option<Vec<T>> {
    let first = rx.blocking_recv()?;
    std::thread::sleep(LINGER);
    let mut batch = Vec::with_capacity(max.min(64));
    batch.push(first);
    while batch.len() < max {
        match rx.try_recv() {
            Ok(item) => batch.push(item),
            Err(_) => break,
        }
    }
    Some(batch)
}

/// The last holder waits for the queue to be written, so a clean shutdown loses nothing.
impl<T> Drop for BatchWriter<T> {
    fn drop(&mut self) {
        drop(self.tx.take());
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::{Arc, Mutex};

    /// (A full queue refusing without a wait is tested through its users:
    /// `decision_log` and `dmarc_reports::recorder`.)
    #[test]
    fn batches_keep_order_and_drop_flushes_everything() {
        let seen: Arc<Mutex<Vec<Vec<u32>>>> = Arc::default();
        let log = seen.clone();
        let writer = BatchWriter::start("test-writer", 1000, 7, move |batch| {
            log.lock().unwrap().push(batch);
        })
        .unwrap();
        for i in 0..100 {
            assert!(writer.try_send(i));
        }
        drop(writer);
        let batches = seen.lock().unwrap().clone();
        assert!(batches.iter().all(|b| !b.is_empty() && b.len() <= 7));
        let all: Vec<u32> = batches.into_iter().flatten().collect();
        assert_eq!(all, (0..100).collect::<Vec<_>>());
    }
}
