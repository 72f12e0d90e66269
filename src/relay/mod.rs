//! The next hop: where accepted mail goes. An SMTP MTA (the normal case, with XCLIENT)
//! or the built-in Maildir for trials.
//!
//! [`Relay`] is one client session's handle: it takes a next-hop connection at the
//! first RCPT (an idle one from the [`pool`], else a new one), passes MAIL/RCPT through,
//! and delivers the message. Any error drops the connection; the next transaction opens
//! a fresh one. At the end of the session a healthy connection goes back to the pool.

pub mod client;
pub mod failure;
pub mod maildir;
pub mod one_shot;
pub mod pool;
pub mod writer;
pub mod xclient;

use std::path::PathBuf;
use std::sync::Arc;

use smtp_proto::{MailFrom, RcptTo};

use crate::config::{Config, ListenerConfig, NextHopAddress, NextHopConfig, Role};
use crate::wire::reply::Reply;
use client::SmtpConnection;
pub use xclient::ClientIdentity;

/// Why the next hop could not be used. Mapped to a 4xx, a log line and a metric by [`failure::report`]:
/// whatever went wrong, the client keeps responsibility for the message and retries.
#[derive(Debug, thiserror::Error)]
pub enum RelayError {
    #[error("downstream connect refused or failed: {0}")]
    Connect(std::io::Error),
    #[error("downstream connect timed out")]
    ConnectTimeout,
    #[error("downstream timed out waiting for {0}")]
    Timeout(&'static str),
    #[error("downstream closed the connection")]
    Closed,
    #[error("downstream I/O error: {0}")]
    Io(std::io::Error),
    #[error("downstream protocol error: {0}")]
    Protocol(String),
    #[error("downstream TLS error: {0}")]
    Tls(String),
    #[error("downstream refused the session: {0}")]
    Rejected(Reply),
    #[error("downstream not usable: {0}")]
    Policy(&'static str),
    /// Credentials would cross a link an attacker could read or redirect.
    #[error("refusing to send credentials to the next hop: {0}")]
    Insecure(&'static str),
    #[error("maildir delivery failed: {0}")]
    Maildir(std::io::Error),
    /// The whole message was sent, then the final reply never came: the next hop may or
    /// may not have taken it.
    #[error("no reply after the end of data: {0}")]
    Unsettled(Box<RelayError>),
}

/// The configured next hop, shared by every session.
pub struct NextHop {
    target: Target,
    cfg: NextHopConfig,
    tls: Option<crate::tls::RelayTlsClient>,
    hostname: String,
    /// Idle connections for later sessions (`pool_size`, `pool_idle_timeout`).
    pool: Arc<pool::Pool>,
    /// Turns to open a connection ([`crate::config::defaults::NEXT_HOP_MAX_OPENING`]).
    opening: tokio::sync::Semaphore,
}

/// How the connection to the next hop is protected.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Link {
    Plain,
    /// Encrypted, certificate not checked: an active attacker on the path can sit in the
    /// middle with a certificate of their own.
    UnverifiedTls,
    /// Encrypted to a certificate that chains to a trusted CA and names the next hop.
    VerifiedTls,
}

/// Whether a client's password may be sent to the next hop at `peer` over `link`: only
/// over verified TLS, or to a loopback address (the traffic never leaves the machine).
/// The address is the one actually connected to, not the configured name, so a host
/// name that resolves elsewhere than expected is judged by where it really led.
/// Opportunistic STARTTLS without verification does not count: stripping it or
/// answering it with a forged certificate is exactly what an attacker on the path does.
pub fn may_send_credentials(peer: std::net::SocketAddr, link: Link) -> Result<(), &'static str> {
    if peer.ip().to_canonical().is_loopback() || link == Link::VerifiedTls {
        return Ok(());
    }
    Err(match link {
        Link::Plain => {
            "the next hop is not on loopback and the connection is not encrypted (tls = \"require\" with tls_verify = true)"
        }
        _ => {
            "the next hop is not on loopback and its certificate is not verified (set tls_verify = true, and tls_ca_file for a private CA)"
        }
    })
}

enum Target {
    Smtp { host: String, port: u16 },
    Maildir(PathBuf),
}

impl NextHop {
    /// The default `[next_hop]`.
    pub fn from_config(config: &Config) -> Result<NextHop, String> {
        Self::new(&config.next_hop.default, &config.hostname)
    }

    pub fn new(cfg: &NextHopConfig, hostname: &str) -> Result<NextHop, String> {
        let target = match NextHopAddress::parse(&cfg.address)? {
            NextHopAddress::Smtp { host, port } => Target::Smtp { host, port },
            NextHopAddress::Maildir(dir) => {
                maildir::prepare(&dir).map_err(|e| format!("maildir {}: {e}", dir.display()))?;
                Target::Maildir(dir)
            }
        };
        let verify = cfg.verifies_tls();
        let tls = match cfg.tls {
            crate::config::RelayTls::Off => None,
            _ => Some(crate::tls::connector(verify, cfg.tls_ca_file.as_deref())?),
        };
        if matches!(target, Target::Smtp { .. }) && !cfg.is_loopback_address() && !verify {
            tracing::warn!(next_hop = %cfg.address,
                "next hop is not loopback and its certificate is not verified (tls_verify = false): mail to it can be read by an attacker on the path, and AUTH is never relayed to it");
        }
        let pool_size = match target {
            Target::Smtp { .. } => cfg.pool_size,
            Target::Maildir(_) => 0,
        };
        Ok(NextHop {
            pool: pool::Pool::new(pool_size, cfg.pool_idle_timeout),
            opening: tokio::sync::Semaphore::new(crate::config::defaults::NEXT_HOP_MAX_OPENING),
            target,
            cfg: cfg.clone(),
            tls,
            hostname: hostname.to_string(),
        })
    }

    pub fn describe(&self) -> String {
        match &self.target {
            Target::Smtp { host, port } => format!("smtp://{host}:{port}"),
            Target::Maildir(dir) => format!("maildir:{}", dir.display()),
        }
    }

    /// Idle connections waiting in the pool (tests).
    pub fn pooled_connections(&self) -> usize {
        self.pool.idle_count()
    }
}

/// Every configured next hop: `[next_hop]` and the named `[next_hop.NAME]` sections, each
/// built once and shared by the listeners (and releases) that use it.
pub struct NextHops {
    default: Arc<NextHop>,
    named: std::collections::BTreeMap<String, Arc<NextHop>>,
    /// The next hop of the first listener of each role, for releases: an entry goes back
    /// the way its role's mail goes.
    by_role: Vec<(Role, Arc<NextHop>)>,
}

impl NextHops {
    pub fn from_config(config: &Config) -> Result<NextHops, String> {
        let default = Arc::new(NextHop::new(&config.next_hop.default, &config.hostname)?);
        let mut named = std::collections::BTreeMap::new();
        for (name, cfg) in &config.next_hop.named {
            let hop = NextHop::new(cfg, &config.hostname)
                .map_err(|e| format!("[next_hop.{name}]: {e}"))?;
            named.insert(name.clone(), Arc::new(hop));
        }
        let mut hops = NextHops {
            default,
            named,
            by_role: Vec::new(),
        };
        for l in &config.listeners {
            if !hops.by_role.iter().any(|(r, _)| *r == l.role) {
                let hop = hops.for_listener(l);
                hops.by_role.push((l.role, hop));
            }
        }
        Ok(hops)
    }

    /// The next hop a listener relays to (validated at load: the name exists).
    pub fn for_listener(&self, listener: &ListenerConfig) -> Arc<NextHop> {
        listener
            .next_hop
            .as_deref()
            .and_then(|n| self.named.get(n))
            .unwrap_or(&self.default)
            .clone()
    }

    /// The next hop of the listener role recorded with a quarantine entry (`inbound`,
    /// `submission`); the default one for a role no listener has any more.
    pub fn for_role(&self, role: &str) -> Arc<NextHop> {
        self.by_role
            .iter()
            .find(|(r, _)| format!("{r:?}").eq_ignore_ascii_case(role))
            .map_or(&self.default, |(_, h)| h)
            .clone()
    }

    /// Says QUIT on every pooled connection of every next hop (see [`pool::Pool::close_idle`]).
    pub async fn close_idle(&self) {
        for hop in std::iter::once(&self.default).chain(self.named.values()) {
            hop.pool.close_idle().await;
        }
    }

    /// One line per next hop, for the start-up log.
    pub fn describe(&self) -> String {
        let mut out = self.default.describe();
        for (name, hop) in &self.named {
            out.push_str(&format!(", {name}={}", hop.describe()));
        }
        out
    }
}

/// One session's use of the next hop.
pub struct Relay {
    hop: Arc<NextHop>,
    conn: Option<SmtpConnection>,
}

/// SASL credentials on their way to the next hop. Never logged: `Debug` shows the
/// user name only.
pub struct Credentials {
    pub authzid: String,
    pub username: String,
    pub password: String,
}

impl std::fmt::Debug for Credentials {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Credentials")
            .field("username", &self.username)
            .finish_non_exhaustive()
    }
}

/// The message envelope as the client gave it.
pub struct Envelope<'a> {
    pub from: &'a MailFrom<String>,
    pub rcpts: &'a [RcptTo<String>],
}

/// The next hop's answer to the start of a transaction ([`Relay::start`]).
pub enum Opening {
    /// MAIL refused: there is no transaction at the next hop. The reply is the answer
    /// to the client's RCPT (and to every later one in this transaction).
    Refused(Reply),
    /// MAIL accepted: the first recipient's result.
    Started(Result<Reply, RelayError>),
}

/// The next hop closed the connection before answering MAIL, or said it is closing it
/// (421).
fn mail_went_away<T>(result: &Result<(Reply, T), RelayError>) -> bool {
    match result {
        Ok((mail, _)) => mail.closes_session(),
        Err(e) => matches!(e, RelayError::Closed | RelayError::Io(_)),
    }
}

impl Relay {
    pub fn new(hop: Arc<NextHop>) -> Relay {
        Relay { hop, conn: None }
    }

    /// Whether the next hop learns the real client (XCLIENT). When it does not (Maildir,
    /// or a next hop without XCLIENT in `auto` mode), we add our own `Received:` line so
    /// the trace still names the client.
    pub fn sees_real_client(&self) -> bool {
        self.conn.as_ref().is_some_and(|c| c.xclient_sent)
    }

    /// Opens the connection if needed and starts a transaction: MAIL and its first
    /// recipient, in one write when the next hop offers PIPELINING (see
    /// [`SmtpConnection::mail_rcpt`]). `Err` is a failure before or at MAIL.
    pub async fn start(
        &mut self,
        client: &ClientIdentity,
        from: &MailFrom<String>,
        size: usize,
        first: &RcptTo<String>,
    ) -> Result<Opening, RelayError> {
        if matches!(self.hop.target, Target::Maildir(_)) {
            return Ok(Opening::Started(Ok(Reply::recipient_ok())));
        }
        // A transaction still open at the next hop (its DATA was refused, so the message
        // never ended there) is closed first: otherwise MAIL would be a nested one.
        self.reset().await;
        let reused = self.connect(client).await?;
        let mut result = self.connection()?.mail_rcpt(from, size, first).await;
        if reused && mail_went_away(&result) {
            // A connection kept from an earlier transaction or taken from the pool was
            // closed by the next hop meanwhile (its idle timeout, a restart). MAIL has
            // changed nothing yet, so one try on a fresh connection is safe, and the
            // client never sees the 451.
            tracing::debug!(error = ?result.as_ref().err(), "next-hop connection went away while idle; reconnecting");
            self.conn = None;
            self.open(client).await?;
            result = self.connection()?.mail_rcpt(from, size, first).await;
        }
        let (mail, rcpt) = match result {
            Ok(answers) => answers,
            Err(e) => {
                // Its state is unknown: never used again.
                self.conn = None;
                return Err(e);
            }
        };
        let mail = self.settle(Ok(mail))?;
        match rcpt {
            Some(rcpt) if mail.is_positive() => Ok(Opening::Started(self.settle(rcpt))),
            rcpt => {
                if matches!(rcpt, Some(Err(_))) {
                    // The answer to the RCPT pipelined after the refused MAIL never
                    // came whole: the connection is out of step.
                    self.conn = None;
                }
                Ok(Opening::Refused(mail))
            }
        }
    }

    /// Passes a client's SASL login to the next hop, which checks it. The connection
    /// stays open and authenticated for the session's transactions.
    pub async fn authenticate(
        &mut self,
        client: &ClientIdentity,
        creds: &Credentials,
    ) -> Result<Reply, RelayError> {
        if matches!(self.hop.target, Target::Maildir(_)) {
            return Err(RelayError::Policy(
                "the Maildir next hop cannot check passwords",
            ));
        }
        self.connect(client).await?;
        let result = self.connection()?.authenticate(creds).await;
        self.settle(result)
    }

    /// Whether a login can be relayed: the next hop answers, offers a mechanism we can
    /// use, and the link may carry a password ([`may_send_credentials`]; checked again
    /// where the password is written). A password is never sent in clear over a network,
    /// nor over TLS that an attacker could terminate with a certificate of their own.
    pub async fn can_authenticate(&mut self, client: &ClientIdentity) -> Result<(), RelayError> {
        if matches!(self.hop.target, Target::Maildir(_)) {
            return Err(RelayError::Policy(
                "the Maildir next hop cannot check passwords",
            ));
        }
        self.connect(client).await?;
        let conn = self.connection()?;
        may_send_credentials(conn.peer(), conn.link()).map_err(RelayError::Insecure)?;
        if !conn.caps.auth.iter().any(|m| m == "PLAIN" || m == "LOGIN") {
            return Err(RelayError::Policy(
                "next hop offers neither AUTH PLAIN nor AUTH LOGIN",
            ));
        }
        Ok(())
    }

    /// Makes sure the session has a connection: the one it holds, else one from the pool
    /// (re-bound to `client`), else a new one. Returns whether it is one that has been
    /// idle (held or pooled), which the next hop may have closed meanwhile.
    async fn connect(&mut self, client: &ClientIdentity) -> Result<bool, RelayError> {
        if self.conn.is_some() || matches!(self.hop.target, Target::Maildir(_)) {
            return Ok(self.conn.is_some());
        }
        if self.take_pooled(client).await {
            return Ok(true);
        }
        self.open(client).await?;
        Ok(false)
    }

    /// A pooled connection for `client`, if one is parked and takes XCLIENT for it. One
    /// that fails is dropped (it never becomes a client-visible error: the caller opens a
    /// fresh one). A session with a login never uses the pool: its connection carries
    /// the login (XCLIENT LOGIN=, AUTH) and is not parked afterwards either.
    async fn take_pooled(&mut self, client: &ClientIdentity) -> bool {
        if client.login.is_some() {
            return false;
        }
        while let Some(mut conn) = self.hop.pool.take() {
            match conn.rebind(client, &self.hop.hostname).await {
                Ok(()) => {
                    self.conn = Some(conn);
                    return true;
                }
                Err(e) => {
                    tracing::debug!(error = %e, "pooled next-hop connection failed XCLIENT; dropped");
                }
            }
        }
        false
    }

    /// Opens a new connection (greeting, EHLO, STARTTLS, XCLIENT as configured).
    async fn open(&mut self, client: &ClientIdentity) -> Result<(), RelayError> {
        let Target::Smtp { host, port } = &self.hop.target else {
            return Ok(());
        };
        // Wait for a turn (bounded by the connect timeout, the same error when it runs
        // out): a burst of sessions must not flood the next hop's listen queue.
        let _turn = tokio::time::timeout(self.hop.cfg.connect_timeout, self.hop.opening.acquire())
            .await
            .ok()
            .and_then(Result::ok)
            .ok_or(RelayError::ConnectTimeout)?;
        let conn = SmtpConnection::open(
            host,
            *port,
            &self.hop.cfg,
            self.hop.tls.as_ref(),
            &self.hop.hostname,
            client,
        )
        .await?;
        self.conn = Some(conn);
        Ok(())
    }

    pub async fn rcpt(&mut self, to: &RcptTo<String>) -> Result<Reply, RelayError> {
        if matches!(self.hop.target, Target::Maildir(_)) {
            return Ok(Reply::recipient_ok());
        }
        let result = self.connection()?.rcpt(to).await;
        self.settle(result)
    }

    /// Sends the message (held as `parts`, see [`writer::without`]). `headers` are added
    /// at the top (trace and verification results). The reply is the next hop's answer
    /// to the end of data.
    pub async fn deliver(
        &mut self,
        envelope: &Envelope<'_>,
        headers: &[String],
        parts: &[&[u8]],
    ) -> Result<Reply, RelayError> {
        match &self.hop.target {
            Target::Maildir(dir) => {
                let mut content =
                    Vec::with_capacity(parts.iter().map(|p| p.len()).sum::<usize>() + 512);
                content.extend_from_slice(
                    format!("Return-Path: <{}>\r\n", envelope.from.address).as_bytes(),
                );
                for rcpt in envelope.rcpts {
                    content.extend_from_slice(
                        format!("Delivered-To: {}\r\n", rcpt.address).as_bytes(),
                    );
                }
                let guard = writer::orphan_fold_guard(headers, parts);
                for h in headers.iter().map(String::as_str).chain(guard) {
                    content.extend_from_slice(h.as_bytes());
                    content.extend_from_slice(b"\r\n");
                }
                for part in parts {
                    content.extend_from_slice(part);
                }
                let (dir, host) = (dir.clone(), self.hop.hostname.clone());
                let path =
                    tokio::task::spawn_blocking(move || maildir::deliver(&dir, &host, &content))
                        .await
                        .map_err(|e| RelayError::Maildir(std::io::Error::other(e)))?
                        .map_err(RelayError::Maildir)?;
                let name = path
                    .file_name()
                    .map(|n| n.to_string_lossy().into_owned())
                    .unwrap_or_default();
                Ok(Reply::stored_as(name))
            }
            Target::Smtp { .. } => {
                let result = self.connection()?.send_message(headers, parts).await;
                self.settle(result)
            }
        }
    }

    /// Ends the open transaction at the next hop (client RSET, or a message we refused),
    /// if one is open there.
    pub async fn reset(&mut self) {
        let Some(conn) = self.conn.as_mut().filter(|c| c.in_transaction) else {
            return;
        };
        let result = conn.rset().await;
        if !matches!(self.settle(result), Ok(r) if r.code == 250) {
            self.conn = None;
        }
    }

    /// Ends this session's use of the next-hop connection: back to the pool when it is in
    /// no transaction, else QUIT. A connection whose last transaction ended with the
    /// next hop's answer to the end of data is parked as it is (that answer ended the
    /// transaction, RFC 5321 §4.1.1.4: an RSET would be a round trip per message for
    /// nothing); one left inside a transaction is parked after an RSET it accepted.
    /// Either way the pool checks the socket is quiet before reuse, and a connection
    /// found closed at MAIL is replaced (see [`Relay::start`]).
    pub async fn close(&mut self) {
        let Some(mut conn) = self.conn.take() else {
            return;
        };
        if conn.reusable && self.hop.pool.enabled() {
            if !conn.in_transaction {
                return self.hop.pool.park(conn);
            }
            match conn.rset().await {
                Ok(r) if r.code == 250 => return self.hop.pool.park(conn),
                Ok(r) if !r.closes_session() => {}
                // Gone or going: no QUIT to say.
                _ => return,
            }
        }
        conn.quit().await;
    }

    fn connection(&mut self) -> Result<&mut SmtpConnection, RelayError> {
        self.conn.as_mut().ok_or(RelayError::Closed)
    }

    /// After one exchange: on any error the connection is dropped and never reused (its
    /// state is unknown), and a 421 from the next hop closes it too.
    fn settle(&mut self, result: Result<Reply, RelayError>) -> Result<Reply, RelayError> {
        if !matches!(&result, Ok(reply) if !reply.closes_session()) {
            self.conn = None;
        }
        // The next hop closing its connection is not the client's session ending: the
        // client gets a retryable 451 and keeps its session (a new connection is opened
        // for its next transaction).
        result.map(|reply| {
            if reply.closes_session() {
                Reply { code: 451, ..reply }
            } else {
                reply
            }
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::wire::reply::Enhanced;
    use std::net::SocketAddr;

    fn at(s: &str) -> SocketAddr {
        s.parse().unwrap()
    }

    #[test]
    fn credentials_need_loopback_or_verified_tls() {
        for remote in ["192.0.2.25:587", "[2001:db8::25]:587", "10.0.0.5:25"] {
            let peer = at(remote);
            assert!(
                may_send_credentials(peer, Link::VerifiedTls).is_ok(),
                "{remote}"
            );
            // Unverified TLS: an attacker on the path answers with their own certificate.
            let e = may_send_credentials(peer, Link::UnverifiedTls).unwrap_err();
            assert!(e.contains("tls_verify"), "{e}");
            let e = may_send_credentials(peer, Link::Plain).unwrap_err();
            assert!(e.contains("not encrypted"), "{e}");
        }
        // Loopback, in any spelling, never leaves the machine.
        for local in [
            "127.0.0.1:10587",
            "127.9.9.9:25",
            "[::1]:25",
            "[::ffff:127.0.0.1]:25",
        ] {
            for link in [Link::Plain, Link::UnverifiedTls, Link::VerifiedTls] {
                assert!(
                    may_send_credentials(at(local), link).is_ok(),
                    "{local} {link:?}"
                );
            }
        }
        // An IPv4-mapped address outside 127/8 is not loopback.
        assert!(may_send_credentials(at("[::ffff:192.0.2.1]:25"), Link::UnverifiedTls).is_err());
    }

    type Transcripts = Arc<std::sync::Mutex<Vec<Vec<String>>>>;

    /// A next hop on loopback: connection 0 serves a transaction (after which it is
    /// parked), then, at the next command, closes without a word (while pooled it looked
    /// quiet: a restart between the check and the first command). Later connections
    /// serve normally. Returns its address and each connection's command lines.
    async fn next_hop_dying_after_park(xclient: bool) -> (SocketAddr, Transcripts) {
        use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let seen: Transcripts = Arc::default();
        let log = seen.clone();
        tokio::spawn(async move {
            for n in 0.. {
                let Ok((tcp, _)) = listener.accept().await else {
                    return;
                };
                log.lock().unwrap().push(Vec::new());
                let log = log.clone();
                tokio::spawn(async move {
                    let (r, mut w) = tcp.into_split();
                    let mut r = BufReader::new(r);
                    w.write_all(b"220 hop.test\r\n").await.unwrap();
                    let (mut line, mut parked) = (String::new(), false);
                    while r.read_line(&mut line).await.unwrap_or(0) > 0 {
                        let cmd = line.trim_end().to_string();
                        line.clear();
                        log.lock().unwrap()[n].push(cmd.clone());
                        if n == 0 && parked {
                            return; // dies without replying
                        }
                        let verb = cmd.split(' ').next().unwrap_or("").to_ascii_uppercase();
                        let reply: &[u8] = match verb.as_str() {
                            "EHLO" if xclient => b"250-hop.test\r\n250-XCLIENT NAME ADDR PORT PROTO HELO\r\n250 8BITMIME\r\n",
                            "EHLO" => b"250-hop.test\r\n250 8BITMIME\r\n",
                            "XCLIENT" => b"220 hop.test\r\n",
                            "DATA" => {
                                w.write_all(b"354 go\r\n").await.unwrap();
                                while r.read_line(&mut line).await.unwrap_or(0) > 0 {
                                    let end = line == ".\r\n";
                                    line.clear();
                                    if end {
                                        break;
                                    }
                                }
                                parked = true;
                                b"250 2.0.0 queued\r\n"
                            }
                            "QUIT" => return,
                            _ => b"250 2.1.0 Ok\r\n",
                        };
                        w.write_all(reply).await.unwrap();
                    }
                });
            }
        });
        (addr, seen)
    }

    fn parse_envelope() -> (MailFrom<String>, RcptTo<String>) {
        let mail = smtp_proto::Request::parse(&mut b"MAIL FROM:<a@b.example>\r\n".iter());
        let rcpt = smtp_proto::Request::parse(&mut b"RCPT TO:<c@d.example>\r\n".iter());
        match (mail.unwrap(), rcpt.unwrap()) {
            (smtp_proto::Request::Mail { from }, smtp_proto::Request::Rcpt { to }) => {
                (from.into_owned(), to.into_owned())
            }
            other => panic!("{other:?}"),
        }
    }

    /// One whole transaction through `hop` for `client`, then the end of the session.
    async fn transaction(hop: &Arc<NextHop>, client: &ClientIdentity) {
        let (from, to) = parse_envelope();
        let mut relay = Relay::new(hop.clone());
        let opening = relay.start(client, &from, 10, &to).await.unwrap();
        assert!(matches!(opening, Opening::Started(Ok(ref r)) if r.code == 250));
        let rcpts = [to];
        let envelope = Envelope {
            from: &from,
            rcpts: &rcpts,
        };
        let parts: [&[u8]; 1] = [b"Subject: t\r\n\r\nbody\r\n"];
        let reply = relay.deliver(&envelope, &[], &parts).await.unwrap();
        assert_eq!(reply.code, 250);
        relay.close().await;
    }

    /// A pooled connection that passes the idle check but is dead at its first command
    /// (XCLIENT, or MAIL without XCLIENT) costs the client nothing: the transaction goes
    /// through a fresh connection.
    #[tokio::test]
    async fn dead_pooled_connection_is_replaced_before_mail() {
        for xclient in [true, false] {
            let (addr, seen) = next_hop_dying_after_park(xclient).await;
            let cfg = NextHopConfig {
                address: format!("smtp://{addr}"),
                tls: crate::config::RelayTls::Off,
                xclient: if xclient {
                    crate::config::XclientMode::Require
                } else {
                    crate::config::XclientMode::Off
                },
                ..NextHopConfig::default()
            };
            let hop = Arc::new(NextHop::new(&cfg, "mw.test").unwrap());
            let client = |port: u16| ClientIdentity {
                addr: SocketAddr::from(([192, 0, 2, 1], port)),
                helo: Some("c.example".into()),
                esmtp: true,
                login: None,
            };
            transaction(&hop, &client(1000)).await;
            assert_eq!(hop.pooled_connections(), 1, "parked after its transaction");
            transaction(&hop, &client(2000)).await;
            let seen = seen.lock().unwrap().clone();
            assert_eq!(seen.len(), 2, "xclient {xclient}: {seen:?}");
            let first_after_park = seen[0].iter().skip_while(|c| *c != "DATA").nth(1);
            let expected = if xclient { "XCLIENT" } else { "MAIL" };
            assert!(
                first_after_park.is_some_and(|c| c.starts_with(expected)),
                "{seen:?}"
            );
            assert!(seen[1].iter().any(|c| c == "DATA"), "{seen:?}");
            if xclient {
                assert!(seen[1].iter().any(|c| c.contains("PORT=2000")), "{seen:?}");
            }
            // The replacement went back to the pool in its turn.
            assert_eq!(hop.pooled_connections(), 1);
        }
    }

    #[test]
    fn insecure_link_refusal_is_454_4_7_0() {
        let r = RelayError::Insecure("x").reply();
        assert_eq!((r.code, r.enhanced), (454, Some(Enhanced(4, 7, 0))));
    }
}
