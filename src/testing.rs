//! Test support: real SMTP sessions over an in-memory pipe, without sockets or the
//! binary. The transcript tests (`tests/transcripts.rs`) drive the protocol through it;
//! everything that needs a process or a TCP connection (signals, TLS, the PROXY
//! protocol, the SMTP next hop's faults) stays in the socket tests.
//!
//! Nothing here is on the proxy's path: the session itself is the production one, only
//! its client stream is [`MaybeTls::Memory`] instead of a TCP connection.

use std::net::SocketAddr;
use std::sync::Arc;

use tokio::io::DuplexStream;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

use crate::config::Config;
use crate::smtp::session::ListenerShared;
use crate::smtp::{Session, SessionShared};
use crate::tls::MaybeTls;

/// Bytes the pipe holds in each direction before a writer waits for the reader: large
/// enough that a pipelined group of commands and its replies never block each other.
const PIPE_BUFFER: usize = 256 * 1024;

/// What a configuration's listeners share, built as the server builds it, minus the
/// sockets: sessions are started by [`InProcess::connect`] instead of an accept loop.
pub struct InProcess {
    shared: Arc<SessionShared>,
    listeners: Vec<Arc<ListenerShared>>,
}

impl InProcess {
    /// Builds the sessions' shared state for `config` (already validated). With
    /// `[auth] enabled = false` every message is relayed (the policy engine and its DNS
    /// are not involved); the outbound detector runs when a submission listener and
    /// `[outbound] enabled` ask for it, as in the server.
    pub async fn new(config: Config) -> Result<InProcess, String> {
        let inspector = crate::server::inspector_for(&config)?;
        let prepared = crate::server::prepare(config, inspector, CancellationToken::new()).await?;
        Ok(InProcess {
            shared: prepared.shared,
            listeners: prepared.listeners,
        })
    }

    /// Starts a session on the listener at `index` (in config order) for a client at
    /// `peer`. Returns the client's end of the pipe and the session's task, which ends
    /// when the session does.
    pub fn connect(&self, index: usize, peer: SocketAddr) -> (DuplexStream, JoinHandle<()>) {
        let (client, server) = tokio::io::duplex(PIPE_BUFFER);
        let session = Session::new(
            MaybeTls::Memory(server),
            peer,
            self.shared.clone(),
            self.listeners[index].clone(),
        );
        (client, tokio::spawn(session.run()))
    }

    /// Asks every session to end, as SIGTERM does: idle ones say 421 and close.
    pub fn shutdown(&self) {
        self.shared.shutdown.cancel();
    }
}
