//! The SMTP wire format, at the bottom of the house: replies, the client reader (codec),
//! command parsing, domain-name syntax, the per-message memory budget, and the trace/date
//! helpers.
//!
//! Nothing here imports another module of ours, so every layer above (the session, the
//! pipeline, relay, quarantine, outbound, policy) can speak SMTP without reaching up
//! into `smtp`.

pub mod codec;
pub mod command;
pub mod domain;
pub mod memory;
pub mod reply;
pub mod trace;
