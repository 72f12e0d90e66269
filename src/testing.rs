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

use crate::config::{Config, Role};
use crate::policy::{AcceptAll, Inspector};
use crate::relay::NextHops;
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
        let inspector: Arc<dyn Inspector> = if config.auth.enabled {
            Arc::new(crate::policy::engine::Enforcer::from_config(&config)?)
        } else {
            Arc::new(AcceptAll)
        };
        let next_hops = NextHops::from_config(&config)?;
        let mut listeners = Vec::new();
        for lc in &config.listeners {
            let tls = match (&lc.tls_cert, &lc.tls_key) {
                (Some(cert), Some(key)) => Some(crate::tls::acceptor(cert, key)?),
                _ => None,
            };
            listeners.push(Arc::new(ListenerShared {
                next_hop: next_hops.for_listener(lc),
                config: lc.clone(),
                tls,
            }));
        }
        let has_submission = config.listeners.iter().any(|l| l.role == Role::Submission);
        let outbound = if config.outbound.enabled && has_submission {
            Some(Arc::new(
                crate::outbound::Detector::new(&config.outbound).await?,
            ))
        } else {
            None
        };
        let quarantine = if config.auth.enabled || outbound.is_some() {
            let opener = crate::quarantine::store::Opener::Proxy;
            Some(crate::quarantine::store::open(&config, opener).await?.0)
        } else {
            None
        };
        let memory = crate::wire::memory::MessageMemory::new(
            config.limits.message_memory,
            crate::metrics::global().message_memory.clone(),
        );
        let signer = crate::signing::Signer::from_config(&config.dkim)?;
        let shared = Arc::new(SessionShared {
            config: Arc::new(config),
            inspector,
            quarantine,
            outbound,
            shutdown: CancellationToken::new(),
            memory,
            dmarc_reports: None,
            signer,
            decision_log: None,
        });
        Ok(InProcess { shared, listeners })
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
