//! One memory budget for the message content that all sessions hold at once
//! (`[limits] message_memory`). Messages are kept in memory until the next hop or the
//! quarantine has them, so without a shared cap, `max_sessions` clients each sending
//! `message_size_limit` bytes could take `max_sessions × message_size_limit` of memory
//! (10 GB with the defaults). A transaction reserves what its buffer holds, in
//! 64 KiB steps, as content arrives; when the budget has no room the rest of the
//! content is read and dropped and the client gets `452 4.3.1` (try again later),
//! as it would on a full disk.
//!
//! What is counted is the receive buffer's capacity. It grows by what arrives or by a
//! quarter (`wire::codec::make_room`), but by doubling when a line with a bare LF comes
//! out longer than it arrived: a message of the size limit may reserve up to twice its
//! size, hence `message_memory` ≥ 2 × `message_size_limit`. What is built for the next
//! hop while relaying (`relay::writer::Encoded`: the added header block, and a rewritten
//! copy of any part that was not canonical) is not counted.

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};

use prometheus_client::metrics::gauge::Gauge;

/// Reservations are made in steps of this size (few atomic updates per message).
const STEP: usize = 64 * 1024;

/// The shared budget.
#[derive(Debug)]
pub struct MessageMemory {
    limit: usize,
    used: AtomicUsize,
    /// Mirrors `used` for export (`mailwarden_message_memory_bytes`); handed in by the
    /// server so that the wire layer imports nothing of ours.
    gauge: Gauge,
}

impl MessageMemory {
    pub fn new(limit: usize, gauge: Gauge) -> Arc<MessageMemory> {
        Arc::new(MessageMemory {
            limit,
            used: AtomicUsize::new(0),
            gauge,
        })
    }

    /// Bytes reserved by all transactions now.
    pub fn in_use(&self) -> usize {
        self.used.load(Ordering::Acquire)
    }
}

/// One transaction's share of the budget; given back when dropped.
#[derive(Debug)]
pub struct Reservation {
    pool: Arc<MessageMemory>,
    held: usize,
}

impl Reservation {
    pub fn new(pool: &Arc<MessageMemory>) -> Reservation {
        Reservation {
            pool: pool.clone(),
            held: 0,
        }
    }

    /// Makes the reservation cover `bytes` (rounded up to the step). False when the
    /// budget has no room; the reservation is then left as it was.
    pub fn cover(&mut self, bytes: usize) -> bool {
        let want = bytes.div_ceil(STEP).saturating_mul(STEP);
        if want <= self.held {
            return true;
        }
        let extra = want - self.held;
        let limit = self.pool.limit;
        let grown = self
            .pool
            .used
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |used| {
                used.checked_add(extra).filter(|&total| total <= limit)
            });
        if grown.is_ok() {
            self.held = want;
            self.pool.gauge.inc_by(extra as i64);
        }
        grown.is_ok()
    }

    /// Gives everything back (the content was dropped).
    pub fn release(&mut self) {
        self.pool.used.fetch_sub(self.held, Ordering::AcqRel);
        self.pool.gauge.dec_by(self.held as i64);
        self.held = 0;
    }
}

impl Drop for Reservation {
    fn drop(&mut self) {
        self.release();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reservations_share_the_budget_and_give_it_back() {
        let pool = MessageMemory::new(4 * STEP, Gauge::default());
        let mut a = Reservation::new(&pool);
        let mut b = Reservation::new(&pool);
        assert!(a.cover(1), "rounded up to one step");
        assert_eq!(pool.in_use(), STEP);
        assert!(a.cover(3 * STEP));
        assert!(a.cover(STEP), "never shrinks");
        assert_eq!(pool.in_use(), 3 * STEP);
        assert!(b.cover(STEP));
        assert!(!b.cover(STEP + 1), "over the budget");
        assert_eq!(
            pool.in_use(),
            4 * STEP,
            "a refused cover holds nothing more"
        );
        drop(a);
        assert_eq!(pool.in_use(), STEP);
        assert!(b.cover(4 * STEP));
        b.release();
        assert_eq!(pool.in_use(), 0);
        assert!(!Reservation::new(&pool).cover(usize::MAX), "no overflow");
    }
}
