//! DMARC aggregate reports (RFC 7489 §7.2 and Appendix C; RFC 9990 where it differs and
//! the RFC 7489 schema allows it).
//!
//! Data moves one way:
//!
//! 1. [`evaluation`]: at the end of DATA, what DMARC found for an inbound message and
//!    what we really did with it becomes one [`Evaluation`].
//! 2. [`recorder`]: a bounded queue and one writer thread put it in the [`store`]
//!    (SQLite beside the quarantine). A full queue drops (and counts) the evaluation:
//!    recording never delays or fails a transaction.
//! 3. [`period`]: once per `interval` (aligned to the epoch) the evaluations of the
//!    period are turned into one report per reporting domain ([`xml`]), compressed and
//!    stored as `pending`, in the same SQLite transaction that deletes the evaluations
//!    and moves the period mark: a period is reported once, even across restarts.
//! 4. [`deliver`]: each pending report is mailed through the next hop to the verified
//!    `rua=` addresses (RFC 7489 §7.1) within their `!size` limits; `pending → sending →
//!    sent`, so it is never sent twice.
//!
//! Failure reports (`ruf=`) are never sent: they carry message content and headers of
//! individual messages (personal data of the recipients), RFC 7489 §9.5 / RFC 9991.

pub mod deliver;
pub mod evaluation;
pub mod period;
pub mod recorder;
pub mod store;
pub mod xml;

pub use evaluation::Evaluation;
pub use recorder::Recorder;
pub use store::{ReportState, ReportStore, SqliteStore, StoredReport};

/// Seconds since the Unix epoch, now.
pub fn now() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}
