//! The client-facing SMTP session: the state machine and one file per phase under
//! `handlers/`. The wire format it speaks (replies, codec, commands) is in [`crate::wire`].

mod handlers;
pub mod session;

pub use session::{Session, SessionShared};
