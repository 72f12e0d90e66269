//! The client-facing SMTP server: wire format, command parsing and the session state
//! machine. One file per phase under `handlers/`.

pub mod codec;
pub mod command;
mod handlers;
pub mod memory;
pub mod reply;
pub mod session;
pub mod trace;

pub use session::{Session, SessionShared};
