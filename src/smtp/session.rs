//! One client session: the command loop and the state it carries.
//!
//! The state is one enum. A handler takes it by value and returns the next one, so a
//! transaction cannot outlive RSET, EHLO or STARTTLS by accident.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Instant;

use smtp_proto::{MailFrom, RcptTo, Request};
use tokio_util::sync::CancellationToken;

use crate::config::{Config, ListenerConfig};
use crate::policy::Inspector;
use crate::relay::{ClientIdentity, NextHop, Relay};
use crate::tls::ClientStream;
use crate::wire::codec::{Line, ReadError, SmtpStream};
use crate::wire::command::{self, Command};
use crate::wire::reply::Reply;

/// What every session of the process shares.
pub struct SessionShared {
    pub config: Arc<Config>,
    pub inspector: Arc<dyn Inspector>,
    /// Where `quarantine` verdicts put messages; without one they are deferred.
    pub quarantine: Option<Arc<dyn crate::quarantine::QuarantineStore>>,
    /// Outbound burst detection for submission listeners (`[outbound] enabled`).
    pub outbound: Option<Arc<crate::outbound::Detector>>,
    /// Cancelled on SIGTERM: idle sessions say 421 and close; open transactions finish.
    pub shutdown: CancellationToken,
    /// Message content held by all sessions (`[limits] message_memory`).
    pub memory: Arc<crate::wire::memory::MessageMemory>,
    /// Records inbound DMARC evaluations for aggregate reports (`[dmarc_reports]`).
    pub dmarc_reports: Option<Arc<crate::dmarc_reports::Recorder>>,
    /// Outbound DKIM signing on submission listeners (`[[dkim.sign]]`).
    pub signer: Option<Arc<crate::signing::Signer>>,
    /// What the policy saw and decided, per transaction (`[decision_log]`).
    pub decision_log: Option<Arc<crate::decision_log::DecisionLog>>,
}

/// What a session shares with the other sessions of its listener.
pub struct ListenerShared {
    pub config: ListenerConfig,
    /// Where this listener's mail goes (`[[listener]] next_hop`).
    pub next_hop: Arc<NextHop>,
    pub tls: Option<tokio_rustls::TlsAcceptor>,
}

/// The client's greeting.
#[derive(Debug, Clone)]
pub struct Helo {
    pub name: String,
    pub esmtp: bool,
}

/// One mail transaction, from MAIL to the end of DATA.
pub struct Transaction {
    pub from: MailFrom<String>,
    /// Recipients the next hop accepted.
    pub rcpts: Vec<RcptTo<String>>,
    /// Recipients asked for, accepted or not (the recipient limit counts these).
    pub rcpt_attempts: usize,
    /// Recipients the next hop refused (a signal of address guessing by a sender).
    pub rcpt_refused: usize,
    /// Whether MAIL has been replayed to the next hop.
    pub relay_started: bool,
    /// Set when the next hop refused MAIL or failed: every later RCPT and DATA gets it.
    pub relay_failure: Option<Reply>,
    /// The policy class of the first accepted recipient (see
    /// [`crate::policy::Inspector::recipient_class`]); a recipient of another class is
    /// answered 452 and comes back in a transaction of its own.
    pub policy_class: Option<Vec<usize>>,
    pub started: Instant,
}

/// Where the session is in the SMTP dialogue.
pub enum State {
    /// Connected (or just after STARTTLS): EHLO/HELO needed.
    Fresh,
    /// Greeted, no transaction open.
    Ready(Helo),
    /// Inside MAIL … DATA.
    Transaction(Helo, Box<Transaction>),
}

impl State {
    pub fn helo(&self) -> Option<&Helo> {
        match self {
            State::Fresh => None,
            State::Ready(h) | State::Transaction(h, _) => Some(h),
        }
    }
    fn in_transaction(&self) -> bool {
        matches!(self, State::Transaction(..))
    }
}

/// Whether the session goes on after a command.
#[derive(Debug, PartialEq, Eq)]
pub enum Flow {
    Continue,
    Close,
}

pub struct Session {
    pub id: String,
    pub(super) stream: SmtpStream<ClientStream>,
    pub(super) shared: Arc<SessionShared>,
    pub(super) listener: Arc<ListenerShared>,
    /// The client's address (from the PROXY header when behind a load balancer).
    pub peer: SocketAddr,
    pub(super) relay: Relay,
    /// The SASL login name once AUTH succeeded (submission listeners).
    pub(super) login: Option<String>,
    errors: u32,
    junk: u32,
    pub(super) transactions: u32,
}

impl Session {
    pub fn new(
        stream: ClientStream,
        peer: SocketAddr,
        shared: Arc<SessionShared>,
        listener: Arc<ListenerShared>,
    ) -> Session {
        Session {
            id: new_session_id(),
            stream: SmtpStream::new(stream),
            relay: Relay::new(listener.next_hop.clone()),
            login: None,
            shared,
            listener,
            peer,
            errors: 0,
            junk: 0,
            transactions: 0,
        }
    }

    pub(super) fn config(&self) -> &Config {
        &self.shared.config
    }

    pub(super) fn is_tls(&self) -> bool {
        self.stream.get_ref().is_tls()
    }

    /// What the next hop is told about the client (XCLIENT).
    pub(super) fn identity(&self, helo: &Helo) -> ClientIdentity {
        ClientIdentity {
            addr: self.peer,
            helo: Some(helo.name.clone()),
            esmtp: helo.esmtp,
            // After AUTH, a replacement next-hop connection (the first one failed, or the
            // client said EHLO again) carries the login as XCLIENT LOGIN=, so the next
            // hop still treats the client as authenticated.
            login: self.login.clone(),
        }
    }

    /// Runs the session to its end: greeting, commands, close.
    pub async fn run(mut self) {
        let greeting = Reply::plain(
            220,
            vec![format!("{} ESMTP mailwarden", self.config().hostname)],
        );
        if self.stream.send(&greeting).await.is_err() {
            return;
        }
        let mut state = State::Fresh;
        loop {
            if self.shared.shutdown.is_cancelled() && !state.in_transaction() {
                self.say_goodbye(Reply::shutting_down()).await;
                break;
            }
            let line = match self.next_line(&state).await {
                Ok(Some(line)) => line,
                Ok(None) => continue, // shutdown noticed while idle: loop says 421
                Err(ReadError::Timeout) => {
                    self.say_goodbye(Reply::timeout()).await;
                    break;
                }
                Err(e) => {
                    tracing::debug!(session = %self.id, error = %e, "client gone");
                    break;
                }
            };
            let (next, flow) = match line {
                Line::TooLong => {
                    let reply = Reply::line_too_long();
                    (state, self.error(reply).await)
                }
                Line::Complete(bytes) => match command::parse(&bytes) {
                    Ok(cmd) => self.dispatch(state, cmd).await,
                    Err(reply) => (state, self.error(reply).await),
                },
            };
            state = next;
            if flow == Flow::Close {
                break;
            }
        }
        // The next-hop connection is parked (or closed) before the client's: a client
        // that saw its session end knows the connection is back in the pool (the 221
        // to QUIT is already sent; only the close waits one RSET round trip).
        self.relay.close().await;
        self.stream.shutdown().await;
    }

    /// Reads the next command line. While no transaction is open, a shutdown interrupts
    /// the wait (returns `None`).
    async fn next_line(&mut self, state: &State) -> Result<Option<Line>, ReadError> {
        let limits = &self.shared.config.limits;
        let (max, timeout) = (limits.max_command_line, limits.command_timeout);
        if state.in_transaction() {
            return self.stream.read_line(max, timeout).await.map(Some);
        }
        let shutdown = self.shared.shutdown.clone();
        tokio::select! {
            line = self.stream.read_line(max, timeout) => line.map(Some),
            _ = shutdown.cancelled() => Ok(None),
        }
    }

    async fn dispatch(&mut self, state: State, cmd: Command) -> (State, Flow) {
        if command::is_junk(&cmd) {
            self.junk += 1;
            if self.junk > self.config().limits.junk_command_limit {
                self.errors += 1;
            }
        }
        match cmd {
            Request::Ehlo { host } => self.on_helo(state, host, true).await,
            Request::Helo { host } => self.on_helo(state, host, false).await,
            Request::Mail { from } => self.on_mail(state, from).await,
            Request::Rcpt { to } => self.on_rcpt(state, to).await,
            Request::Data => self.on_data(state).await,
            Request::StartTls => self.on_starttls(state).await,
            Request::Rset => self.on_rset(state).await,
            Request::Noop { .. } => self.ok(state, Reply::ok()),
            Request::Vrfy { .. } => self.ok(state, Reply::cannot_vrfy()),
            Request::Help { .. } => self.ok(state, Reply::help()),
            Request::Quit => {
                self.say_goodbye(Reply::bye()).await;
                (state, Flow::Close)
            }
            Request::Bdat { .. } => {
                // CHUNKING is not offered. The chunk's bytes that follow would otherwise be
                // read as commands (a smuggling vector), so the session ends here.
                self.say_goodbye(Reply::bdat_not_offered()).await;
                (state, Flow::Close)
            }
            Request::Auth {
                mechanism,
                initial_response,
            } => self.on_auth(state, mechanism, initial_response).await,
            Request::Lhlo { .. }
            | Request::Expn { .. }
            | Request::Etrn { .. }
            | Request::Atrn { .. }
            | Request::Burl { .. } => {
                let reply = Reply::not_implemented();
                (state, self.error(reply).await)
            }
        }
    }

    /// Queues a positive reply.
    pub(super) fn ok(&mut self, state: State, reply: Reply) -> (State, Flow) {
        self.stream.queue(&reply);
        (state, Flow::Continue)
    }

    /// Queues a reply to a client error, applying the soft and hard error limits
    /// (Postfix: past the soft limit every error reply is delayed; at the hard limit the
    /// session ends).
    pub(super) async fn error(&mut self, reply: Reply) -> Flow {
        self.errors += 1;
        let limits = &self.shared.config.limits;
        let (soft, hard, sleep) = (
            limits.soft_error_limit,
            limits.hard_error_limit,
            limits.error_sleep,
        );
        if self.errors >= hard {
            self.stream.queue(&reply);
            tracing::info!(session = %self.id, client = %self.peer, errors = self.errors, "too many errors, closing");
            self.say_goodbye(Reply::too_many_errors()).await;
            return Flow::Close;
        }
        if self.errors > soft {
            let _ = self.stream.flush().await;
            tokio::time::sleep(sleep).await;
        }
        self.stream.queue(&reply);
        Flow::Continue
    }

    /// Sends a final reply (flushing anything queued before it).
    pub(super) async fn say_goodbye(&mut self, reply: Reply) {
        let timeout = self.shared.config.limits.command_timeout;
        let _ = tokio::time::timeout(timeout, self.stream.send(&reply)).await;
    }
}

/// 96 random bits, as 24 hex digits: unique in logs across restarts and instances.
fn new_session_id() -> String {
    let bits: u128 = rand::random::<u128>() >> 32;
    format!("{bits:024X}")
}
