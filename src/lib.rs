//! mailwarden: an SMTP proxy that stands in front of a real mail server, checks who
//! really sent each message, and relays, tags, defers, rejects or quarantines it.
//!
//! A message's way through the code:
//!
//! ```text
//! server   (listeners, limits, PROXY protocol, TLS)
//!   └▶ smtp (session state machine, codec, handlers per phase)
//!        ├▶ relay   (next-hop client: XCLIENT, MAIL/RCPT pass-through, canonical DATA; Maildir)
//!        └▶ policy  (the verdict hook asked at end of DATA)
//! ```

#![forbid(unsafe_code)]

pub mod admin;
pub mod auth;
pub mod batch_writer;
pub mod check;
pub mod config;
pub mod decision_log;
pub mod dkim_key;
pub mod dmarc_reports;
#[doc(hidden)]
pub mod fuzzing;
pub mod metrics;
pub mod outbound;
pub mod pipeline;
pub mod policy;
pub mod quarantine;
pub mod relay;
pub mod server;
pub mod service;
pub mod signing;
pub mod smtp;
pub mod store;
pub mod telemetry;
/// In-process sessions for the transcript tests (no sockets); not part of the API.
#[doc(hidden)]
pub mod testing;
pub mod tls;
pub mod wire;
