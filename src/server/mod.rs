//! Listeners: bind, accept, apply connection limits, PROXY protocol and implicit TLS,
//! then hand each connection to an SMTP [`Session`]. Also the drain on shutdown.

mod limits;
pub mod proxy_protocol;
pub mod reload;
pub mod shutdown;

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use tokio::io::AsyncWriteExt;
use tokio::net::{TcpListener, TcpStream};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::config::Config;
use crate::config::defaults::{PROXY_HEADER_TIMEOUT, TLS_HANDSHAKE_TIMEOUT};
use crate::policy::engine::Enforcer;
use crate::policy::{AcceptAll, Inspector};
use crate::quarantine::QuarantineStore;
use crate::relay::NextHops;
use crate::smtp::session::ListenerShared;
use crate::smtp::{Session, SessionShared};
use crate::tls::MaybeTls;
use crate::wire::reply::Reply;
use limits::ConnectionLimits;

/// A listener that is bound and ready to accept: its settings are the `index`-th of the
/// current [`reload::Generation`].
struct Bound {
    socket: TcpListener,
    index: usize,
}

/// Everything checked and bound, not yet accepting: errors here stop the start.
pub struct Server {
    listeners: Vec<Bound>,
    live: Arc<reload::Live>,
    /// Services that run beside the listeners until shutdown, handed in from above
    /// (the admin HTTP API: `crate::admin::http::start`). The server never imports them.
    beside: Vec<std::pin::Pin<Box<dyn std::future::Future<Output = ()> + Send>>>,
}

impl Server {
    /// Builds TLS contexts, the verdict engine and the quarantine, prepares the next hop
    /// and binds every listener.
    pub async fn bind(config: Config, shutdown: CancellationToken) -> Result<Server, String> {
        let inspector = inspector_for(&config)?;
        Self::bind_with(config, inspector, shutdown).await
    }

    /// [`Server::bind`], remembering `path` so that [`reload::Live::reload`] can read it
    /// again, with the SIGHUP handler installed and then `[process] pid_file` written.
    pub async fn bind_reloadable(
        config: Config,
        path: &std::path::Path,
        shutdown: CancellationToken,
    ) -> Result<Server, String> {
        let server = Self::bind(config, shutdown).await?;
        server.live.set_path(path.to_path_buf());
        // SIGHUP is handled before the pid file exists: a `mailwarden reload` right
        // after the start must not meet SIGHUP's default action (terminate).
        shutdown::on_reload(server.live())
            .map_err(|e| format!("cannot install the SIGHUP handler: {e}"))?;
        server.live.write_pid_file()?;
        Ok(server)
    }

    pub async fn bind_with(
        config: Config,
        inspector: Arc<dyn Inspector>,
        shutdown: CancellationToken,
    ) -> Result<Server, String> {
        preflight(&config)?;
        let bound = config.listeners.clone();
        let Prepared {
            shared,
            listeners: settings,
            next_hops,
        } = prepare(config, inspector, shutdown).await?;
        let mut listeners = Vec::new();
        let mut limits = Vec::new();
        for (index, lc) in bound.iter().enumerate() {
            let socket = listen(lc.address, lc.max_sessions)
                .map_err(|e| format!("cannot listen on {}: {e}", lc.address))?;
            listeners.push(Bound { socket, index });
            limits.push(Arc::new(ConnectionLimits::new(
                lc.max_sessions,
                lc.max_sessions_per_client,
            )));
        }
        let first = reload::Generation {
            shared,
            listeners: settings,
            limits,
            next_hops,
        };
        Ok(Server {
            listeners,
            live: Arc::new(reload::Live::new(first, bound)),
            beside: Vec::new(),
        })
    }

    /// The running configuration and its reload (SIGHUP, `mailwarden reload`).
    pub fn live(&self) -> Arc<reload::Live> {
        self.live.clone()
    }

    /// Runs `service` beside the listeners from [`Server::run`] on; it must stop on the
    /// shutdown token, and `run` waits for it after the sessions.
    pub fn serve_beside(
        &mut self,
        service: impl std::future::Future<Output = ()> + Send + 'static,
    ) {
        self.beside.push(Box::pin(service));
    }

    /// Addresses actually bound (useful when a config says port 0).
    pub fn local_addrs(&self) -> Vec<SocketAddr> {
        self.listeners
            .iter()
            .filter_map(|l| l.socket.local_addr().ok())
            .collect()
    }

    /// Serves until the shutdown token is cancelled, then stops accepting and waits up
    /// to the grace period for sessions to finish. Returns how many were still running.
    pub async fn run(self) -> usize {
        let tracker = TaskTracker::new();
        let first = self.live.current();
        let shutdown = first.shared.shutdown.clone();
        let mut accept_loops = Vec::new();
        for bound in self.listeners {
            let addr = bound
                .socket
                .local_addr()
                .map(|a| a.to_string())
                .unwrap_or_default();
            let settings = &first.listeners[bound.index];
            tracing::info!(address = %addr, role = ?settings.config.role,
                tls = settings.tls.is_some(), implicit_tls = settings.config.implicit_tls,
                proxy_protocol = settings.config.proxy_protocol, "listening");
            accept_loops.push(tokio::spawn(accept_loop(
                bound,
                self.live.clone(),
                shutdown.clone(),
                tracker.clone(),
            )));
        }
        // The detector's housekeeping writes a last snapshot when shutdown starts: wait
        // for it below so the counters survive the restart.
        self.live.start_outbound_tasks(&shutdown);
        if first.shared.dmarc_reports.is_some() {
            match crate::dmarc_reports::period::Outbox::from_config(&first.shared.config) {
                Ok(outbox) => {
                    tokio::spawn(crate::dmarc_reports::period::run(
                        first.shared.config.clone(),
                        outbox,
                        shutdown.clone(),
                    ));
                }
                Err(e) => tracing::error!(error = %e, "DMARC reports: cannot send reports"),
            }
        }
        if let Some(store) = first.shared.quarantine.clone() {
            let retention = first.shared.config.quarantine.retention;
            tokio::spawn(apply_retention(store, retention, shutdown.clone()));
        }
        drop(first);
        let beside: Vec<_> = self.beside.into_iter().map(tokio::spawn).collect();
        shutdown.cancelled().await;
        for l in accept_loops {
            let _ = l.await; // the loops end on the same token and drop their sockets
        }
        tracker.close();
        // The grace period of the configuration running now (it may have been reloaded).
        let grace = self.live.current().shared.config.shutdown.grace_period;
        tracing::info!(
            sessions = tracker.len(),
            grace_s = grace.as_secs(),
            "shutting down: no longer accepting"
        );
        if tokio::time::timeout(grace, tracker.wait()).await.is_err() {
            tracing::warn!(
                sessions = tracker.len(),
                "grace period over: closing remaining sessions"
            );
        }
        for service in beside {
            let _ = service.await; // stops on the same token
        }
        self.live.stop_outbound_tasks().await;
        // Pooled next-hop connections end with QUIT, not a lost connection in its log.
        self.live.current().next_hops.close_idle().await;
        self.live.remove_pid_file();
        tracker.len()
    }
}

/// The verdict engine for `config`: sender authentication, spoof checks and the rules,
/// or relay-everything when `[auth] enabled = false`.
pub fn inspector_for(config: &Config) -> Result<Arc<dyn Inspector>, String> {
    Ok(if config.auth.enabled {
        Arc::new(Enforcer::from_config(config)?)
    } else {
        Arc::new(AcceptAll)
    })
}

/// What the sessions of one configuration share, without sockets.
pub struct Prepared {
    pub shared: Arc<SessionShared>,
    /// One per listener, in config order.
    pub listeners: Vec<Arc<ListenerShared>>,
    pub next_hops: Arc<NextHops>,
}

/// Builds the sessions' shared state for `config` (already checked): next hops, DKIM
/// signer, outbound detector, quarantine, listener TLS, DMARC report recorder, decision
/// log and the message memory budget. The server binds its sockets around it, and the
/// in-process sessions of `crate::testing` run on it as built here.
pub async fn prepare(
    config: Config,
    inspector: Arc<dyn Inspector>,
    shutdown: CancellationToken,
) -> Result<Prepared, String> {
    let next_hops = Arc::new(NextHops::from_config(&config)?);
    let signer = crate::signing::Signer::from_config(&config.dkim)?;
    let has_submission = config
        .listeners
        .iter()
        .any(|l| l.role == crate::config::Role::Submission);
    let outbound = if config.outbound.enabled && has_submission {
        Some(Arc::new(
            crate::outbound::Detector::new(&config.outbound).await?,
        ))
    } else {
        None
    };
    let quarantine = if config.auth.enabled || outbound.is_some() {
        let (q, pool) =
            crate::quarantine::store::open(&config, crate::quarantine::store::Opener::Proxy)
                .await?;
        if let Some(pool) = pool {
            // Probes a server that is down (or was at start) until it answers, so
            // /healthz and postgres_up turn green without waiting for held mail.
            tokio::spawn(pool.watch(Duration::from_secs(2), shutdown.clone()));
        }
        tracing::info!(backend = q.backend(), "quarantine");
        crate::quarantine::export_usage(q.as_ref()).await;
        Some(q)
    } else {
        None
    };
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
    tracing::info!(next_hop = %next_hops.describe(), "next hop");
    // `off` is a choice, but never a silent one: the next hop judges our address.
    let hops = std::iter::once((String::new(), &config.next_hop.default))
        .chain(config.next_hop.named.iter().map(|(n, h)| (n.clone(), h)));
    for (name, hop) in hops {
        if hop.xclient == crate::config::XclientMode::Off && hop.address.starts_with("smtp:") {
            tracing::warn!(next_hop = %hop.address, section = %if name.is_empty() { "next_hop".to_string() } else { format!("next_hop.{name}") },
                "xclient = \"off\": the next hop sees our address, not the client's; make sure it does not trust it (mynetworks)");
        }
    }
    let dmarc_reports = dmarc_recorder(&config)?;
    let decision_log = decision_log(&config)?;
    let shared = Arc::new(SessionShared {
        memory: crate::wire::memory::MessageMemory::new(
            config.limits.message_memory,
            crate::metrics::global().message_memory.clone(),
        ),
        config: Arc::new(config),
        inspector,
        quarantine,
        outbound,
        shutdown,
        dmarc_reports,
        signer,
        decision_log,
    });
    Ok(Prepared {
        shared,
        listeners,
        next_hops,
    })
}

/// Every check of the files the proxy needs before it serves, without binding or
/// creating anything: listener certificates and keys, the policy file, the outbound
/// freeze file (and Redis URL). The admin API's files (token, certificate) are checked
/// by `crate::admin::http::preflight`, which `check-config` runs beside this and `run`
/// meets when it binds the API; a reload need not check them, since `[admin]` changes
/// wait for a restart and the running API keeps the token it loaded.
/// `check-config` runs exactly this after loading the configuration, and `run` runs it
/// first, so an `ok` from `check-config` means `run` gets past them. Returns the policy
/// file's warnings (valid but unsafe rules), which `check-config` prints.
pub fn preflight(config: &Config) -> Result<Vec<String>, String> {
    for (i, l) in config.listeners.iter().enumerate() {
        if let (Some(cert), Some(key)) = (&l.tls_cert, &l.tls_key) {
            crate::tls::acceptor(cert, key)
                .map_err(|e| format!("listener[{i}] ({}): tls: {e}", l.address))?;
        }
    }
    if !config.dns.zone_files.is_empty() {
        crate::auth::zones::ZoneSet::load(&config.dns.zone_files)
            .map_err(|e| format!("[dns] zone_files: {e}"))?;
    }
    let mut warnings = Vec::new();
    if let Some(path) = config.policy_file() {
        warnings = crate::policy::rules::Policy::load(path)
            .map_err(|e| e.to_string())?
            .warnings;
    }
    let outbound = &config.outbound;
    let has_submission = config
        .listeners
        .iter()
        .any(|l| l.role == crate::config::Role::Submission);
    if outbound.enabled && has_submission {
        // What the burst detector refuses to start with.
        let settings = std::sync::Arc::new(crate::outbound::config::Settings::new(outbound)?);
        crate::outbound::freeze::FreezeBook::load(&outbound.freeze_file)?;
        if outbound.backend == crate::outbound::config::Backend::Redis {
            crate::outbound::redis_store::RedisStore::new(settings)?;
        }
    }
    Ok(warnings)
}

/// Purges quarantine entries past their retention, once at start and then hourly.
async fn apply_retention(
    store: Arc<dyn QuarantineStore>,
    retention: Duration,
    shutdown: CancellationToken,
) {
    let mut tick = tokio::time::interval(crate::config::defaults::QUARANTINE_PURGE_INTERVAL);
    loop {
        tokio::select! {
            _ = tick.tick() => {}
            _ = shutdown.cancelled() => return,
        }
        // With a shared (PostgreSQL) store every instance purges: the deletes are
        // idempotent, so whichever comes first does the work.
        match store.purge_older_than(retention.as_secs()).await {
            Ok(0) => {}
            Ok(n) => tracing::info!(
                entries = n,
                retention_days = retention.as_secs() / 86_400,
                "quarantine: purged old entries"
            ),
            Err(e) => tracing::error!(error = %e, "quarantine: purge failed"),
        }
        update_held_gauge(store.as_ref()).await;
    }
}

/// Copies the burst detector's state into the metrics every few seconds.
async fn export_outbound_metrics(
    detector: Arc<crate::outbound::Detector>,
    shutdown: CancellationToken,
) {
    let m = crate::metrics::global();
    let mut reported = 0;
    let mut tick = tokio::time::interval(Duration::from_secs(5));
    loop {
        tokio::select! {
            _ = tick.tick() => {}
            _ = shutdown.cancelled() => return,
        }
        let alerts = detector.alerts_sent();
        m.burst_alerts.inc_by(alerts.saturating_sub(reported));
        reported = alerts;
        m.frozen_accounts.set(detector.frozen_accounts() as i64);
        m.redis_fallback
            .set(i64::from(detector.backend_status().contains("unavailable")));
    }
}

/// Sets the quarantine gauges from the store's counts.
pub async fn update_held_gauge(store: &dyn QuarantineStore) {
    if let Ok(counts) = store.counts().await {
        let held: u64 = counts
            .iter()
            .filter(|(s, _)| s.is_pending())
            .map(|(_, n)| n)
            .sum();
        crate::metrics::global()
            .quarantine_held
            .set(i64::try_from(held).unwrap_or(i64::MAX));
    }
    crate::quarantine::export_usage(store).await;
}

/// Binds with a listen backlog that can hold a burst of `max_sessions` connections (the
/// default 128 would strand clients behind SYN cookies, waiting for a greeting that never
/// comes).
fn listen(addr: SocketAddr, max_sessions: usize) -> std::io::Result<TcpListener> {
    let socket = if addr.is_ipv4() {
        tokio::net::TcpSocket::new_v4()?
    } else {
        tokio::net::TcpSocket::new_v6()?
    };
    socket.set_reuseaddr(true)?;
    // Accepted connections take TCP_NODELAY from the listening socket on Linux: one
    // system call per listener instead of one per session (`NoDelay` checks it).
    socket.set_nodelay(true)?;
    socket.bind(addr)?;
    socket.listen(u32::try_from(max_sessions.max(1024)).unwrap_or(u32::MAX))
}

/// The decision log's writer, when the log is on and a stage decides anything (the
/// policy with `[auth]`, the burst detector with `[outbound]`). The directory is created by the writer, whose
/// errors are logged and counted: the log never stops the proxy or a transaction.
fn decision_log(config: &Config) -> Result<Option<Arc<crate::decision_log::DecisionLog>>, String> {
    let cfg = &config.decision_log;
    if !cfg.enabled || !(config.auth.enabled || config.outbound.enabled) {
        return Ok(None);
    }
    let store = crate::decision_log::store::FileStore::new(cfg);
    let log = crate::decision_log::DecisionLog::start(Box::new(store), cfg.queue)
        .map_err(|e| format!("[decision_log]: cannot start the writer: {e}"))?;
    Ok(Some(Arc::new(log)))
}

/// The recorder of DMARC evaluations, when reports are on and checks run. The store is
/// opened here, so a bad `[dmarc_reports] db` stops the start.
fn dmarc_recorder(config: &Config) -> Result<Option<Arc<crate::dmarc_reports::Recorder>>, String> {
    let cfg = &config.dmarc_reports;
    if !cfg.enabled || !config.auth.enabled {
        return Ok(None);
    }
    let store = crate::dmarc_reports::SqliteStore::open(&cfg.db)
        .map_err(|e| format!("[dmarc_reports] db {}: {e}", cfg.db.display()))?;
    let recorder =
        crate::dmarc_reports::Recorder::start(Box::new(store), cfg.queue, cfg.opt_out.clone())
            .map_err(|e| format!("[dmarc_reports]: cannot start the recorder: {e}"))?;
    Ok(Some(Arc::new(recorder)))
}

async fn accept_loop(
    bound: Bound,
    live: Arc<reload::Live>,
    shutdown: CancellationToken,
    tracker: TaskTracker,
) {
    let mut nodelay = NoDelay::Unknown;
    loop {
        let accepted = tokio::select! {
            a = bound.socket.accept() => a,
            _ = shutdown.cancelled() => break,
        };
        let (tcp, peer) = match accepted {
            Ok(a) => a,
            Err(e) => {
                // EMFILE and friends: wait for sessions to end instead of spinning or dying.
                tracing::error!(error = %e, "accept failed");
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
        };
        nodelay.apply(&tcp);
        // The session keeps the generation current now to its end (see `reload`).
        let generation = live.current();
        let (listener, limits, shared) = (
            generation.listeners[bound.index].clone(),
            generation.limits[bound.index].clone(),
            generation.shared.clone(),
        );
        tracker.spawn(async move { serve_connection(tcp, peer, listener, limits, shared).await });
    }
}

/// Whether accepted connections come with TCP_NODELAY already set (inherited from the
/// listening socket, as on Linux), learnt from the first one. Replies must not wait for
/// Nagle's algorithm, so where it is not inherited it is set on every connection.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum NoDelay {
    Unknown,
    Inherited,
    SetEach,
}

impl NoDelay {
    fn apply(&mut self, tcp: &TcpStream) {
        if *self == NoDelay::Unknown {
            *self = if tcp.nodelay().unwrap_or(false) {
                NoDelay::Inherited
            } else {
                NoDelay::SetEach
            };
            tracing::debug!(nodelay = ?*self, "TCP_NODELAY of accepted connections");
        }
        if *self == NoDelay::SetEach {
            let _ = tcp.set_nodelay(true);
        }
    }
}

/// Everything between accept and the SMTP greeting.
async fn serve_connection(
    mut tcp: TcpStream,
    tcp_peer: SocketAddr,
    listener: Arc<ListenerShared>,
    limits: Arc<ConnectionLimits>,
    shared: Arc<SessionShared>,
) {
    let lc = &listener.config;
    let peer = if lc.proxy_protocol {
        if !proxy_protocol::is_trusted(tcp_peer.ip().to_canonical(), &lc.trusted_proxies) {
            tracing::warn!(peer = %tcp_peer, "PROXY listener: connection from an untrusted address dropped");
            return;
        }
        match proxy_protocol::read_header(&mut tcp, PROXY_HEADER_TIMEOUT).await {
            Ok(Some(addrs)) => addrs.source,
            Ok(None) => tcp_peer,
            Err(e) => {
                tracing::warn!(peer = %tcp_peer, error = %e, "bad PROXY header");
                return;
            }
        }
    } else {
        tcp_peer
    };
    let metrics = crate::metrics::global();
    let _slot = match limits.admit(peer.ip()) {
        Ok(slot) => slot,
        Err(reply) => {
            let why = if reply.enhanced.is_some_and(|e| e.2 == 2) {
                "max_sessions"
            } else {
                "per_client"
            };
            metrics
                .sessions_refused
                .get_or_create(&crate::metrics::label("limit", why))
                .inc();
            tracing::info!(client = %peer, reply = %reply, "connection refused by limits");
            refuse(
                tcp,
                &reply,
                listener.tls.as_ref().filter(|_| lc.implicit_tls),
            )
            .await;
            return;
        }
    };
    let stream = if lc.implicit_tls {
        let Some(acceptor) = &listener.tls else {
            return;
        };
        match tokio::time::timeout(TLS_HANDSHAKE_TIMEOUT, acceptor.accept(tcp)).await {
            Ok(Ok(tls)) => MaybeTls::Tls(Box::new(tls)),
            _ => {
                tracing::info!(client = %peer, "implicit TLS handshake failed");
                return;
            }
        }
    } else {
        MaybeTls::Plain(tcp)
    };
    let role = format!("{:?}", lc.role).to_lowercase();
    metrics
        .sessions
        .get_or_create(&crate::metrics::label("role", role))
        .inc();
    metrics.sessions_active.inc();
    let session = Session::new(stream, peer, shared, listener);
    tracing::debug!(session = %session.id, client = %peer, "connected");
    session.run().await;
    metrics.sessions_active.dec();
}

/// Sends a refusal and closes (through TLS on an implicit-TLS listener).
async fn refuse(mut tcp: TcpStream, reply: &Reply, tls: Option<&tokio_rustls::TlsAcceptor>) {
    let bytes = reply.to_bytes();
    let _ = tokio::time::timeout(Duration::from_secs(10), async {
        match tls {
            Some(acceptor) => {
                if let Ok(mut s) = acceptor.accept(tcp).await {
                    let _ = s.write_all(&bytes).await;
                    let _ = s.shutdown().await;
                }
            }
            None => {
                let _ = tcp.write_all(&bytes).await;
                let _ = tcp.shutdown().await;
            }
        }
    })
    .await;
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Whatever the platform does, an accepted connection ends up with TCP_NODELAY;
    /// on Linux it comes from the listening socket and costs no system call per session.
    #[tokio::test]
    async fn accepted_connections_have_nodelay() {
        let listener = listen("127.0.0.1:0".parse().unwrap(), 1).unwrap();
        let addr = listener.local_addr().unwrap();
        let mut nodelay = NoDelay::Unknown;
        for _ in 0..2 {
            let _client = TcpStream::connect(addr).await.unwrap();
            let (tcp, _) = listener.accept().await.unwrap();
            nodelay.apply(&tcp);
            assert!(tcp.nodelay().unwrap());
        }
        if cfg!(target_os = "linux") {
            assert_eq!(nodelay, NoDelay::Inherited);
        }
    }
}
