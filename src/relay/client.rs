//! SMTP client towards the next hop: one connection serves one client session at a
//! time, and may serve more in turn from the pool (`super::pool`).
//!
//! Every command is built here from parsed values; nothing the client sent is copied
//! through. Every wait has a deadline. Any protocol surprise poisons the connection:
//! the caller drops it and opens a fresh one for the next transaction.

use std::time::Duration;

use smtp_proto::{MailFrom, RcptTo};
use tokio::net::TcpStream;

use super::RelayError;
use super::writer::{Encoded, Framing};
use super::xclient::{self, ClientIdentity};
use crate::config::defaults::{MAX_RELAY_REPLY_LINE, MAX_RELAY_REPLY_LINES};
use crate::config::{NextHopConfig, RelayTls, XclientMode};
use crate::tls::{MaybeTls, RelayStream};
use crate::wire::codec::{Line, ReadError, SmtpStream};
use crate::wire::reply::{self, Reply};

/// What the next hop said it supports in its EHLO reply.
#[derive(Debug, Default, Clone)]
pub struct Capabilities {
    pub size: Option<u64>,
    pub eight_bit_mime: bool,
    pub smtputf8: bool,
    pub dsn: bool,
    pub starttls: bool,
    pub pipelining: bool,
    /// CHUNKING (RFC 3030): the message goes in one `BDAT <size> LAST`.
    pub chunking: bool,
    /// `Some(attributes)` when XCLIENT is offered.
    pub xclient: Option<Vec<String>>,
    /// SASL mechanisms offered (upper case).
    pub auth: Vec<String>,
}

impl Capabilities {
    fn from_ehlo(reply: &Reply) -> Capabilities {
        let mut caps = Capabilities::default();
        for line in reply.lines.iter().skip(1) {
            let mut words = line.split_ascii_whitespace();
            let Some(keyword) = words.next() else {
                continue;
            };
            match keyword.to_ascii_uppercase().as_str() {
                "SIZE" => caps.size = Some(words.next().and_then(|w| w.parse().ok()).unwrap_or(0)),
                "8BITMIME" => caps.eight_bit_mime = true,
                "SMTPUTF8" => caps.smtputf8 = true,
                "DSN" => caps.dsn = true,
                "STARTTLS" => caps.starttls = true,
                "PIPELINING" => caps.pipelining = true,
                "CHUNKING" => caps.chunking = true,
                "XCLIENT" => caps.xclient = Some(words.map(str::to_string).collect()),
                "AUTH" => caps.auth = words.map(|w| w.to_ascii_uppercase()).collect(),
                _ => {}
            }
        }
        caps
    }
}

/// The recipient of the relay probe: a reserved domain that is never anybody's local one.
const RELAY_PROBE_RCPT: &str = "relay-probe@mailwarden-relay-probe.invalid";

/// A session relayed without XCLIENT (`xclient = "auto"`, the next hop checked not to
/// trust us): counted every time; the first one of the process is an ERROR, because the
/// next hop then applies its rules to our address, not the client's (its logs, rate
/// limits and blocklists all see us).
fn note_relay_without_xclient(next_hop: impl std::fmt::Display) {
    use std::sync::atomic::{AtomicBool, Ordering};
    static LOGGED: AtomicBool = AtomicBool::new(false);
    crate::metrics::global().relay_without_xclient.inc();
    if !LOGGED.swap(true, Ordering::Relaxed) {
        tracing::error!(next_hop = %next_hop,
            "relaying without XCLIENT (xclient = \"auto\", not offered): the next hop sees our address, not the client's; authorize XCLIENT for us (smtpd_authorized_xclient_hosts) or set xclient = \"require\"");
    }
}

pub struct SmtpConnection {
    stream: SmtpStream<RelayStream>,
    pub caps: Capabilities,
    cfg: NextHopConfig,
    /// Whether the next hop was told the real client with XCLIENT.
    pub xclient_sent: bool,
    /// The address actually connected to (after name resolution).
    peer: std::net::SocketAddr,
    /// Whether the TLS session (if any) verified the next hop's certificate.
    tls_verified: bool,
    /// Whether the connection may serve another client session (the pool): not once a
    /// login went over it (AUTH, or XCLIENT LOGIN=), whose state at the next hop another
    /// client must never inherit.
    pub reusable: bool,
    /// Whether a transaction is open at the next hop: MAIL accepted, and neither an
    /// answer to the end of data nor an accepted RSET (nor XCLIENT, a new session) since.
    pub in_transaction: bool,
}

impl SmtpConnection {
    /// Connects, reads the greeting, says EHLO, upgrades to TLS and sends XCLIENT as
    /// configured, and returns a connection ready for MAIL.
    pub async fn open(
        host: &str,
        port: u16,
        cfg: &NextHopConfig,
        tls: Option<&crate::tls::RelayTlsClient>,
        our_name: &str,
        client: &ClientIdentity,
    ) -> Result<SmtpConnection, RelayError> {
        let tcp = tokio::time::timeout(cfg.connect_timeout, TcpStream::connect((host, port)))
            .await
            .map_err(|_| RelayError::ConnectTimeout)?
            .map_err(RelayError::Connect)?;
        let _ = tcp.set_nodelay(true);
        let peer = tcp.peer_addr().map_err(RelayError::Connect)?;
        let mut conn = SmtpConnection {
            stream: SmtpStream::new(MaybeTls::Plain(tcp)),
            caps: Capabilities::default(),
            cfg: cfg.clone(),
            xclient_sent: false,
            peer,
            tls_verified: false,
            reusable: true,
            in_transaction: false,
        };
        conn.expect_greeting().await?;
        conn.ehlo(our_name).await?;

        if cfg.tls != RelayTls::Off && conn.caps.starttls {
            conn.starttls(host, tls).await?;
            conn.ehlo(our_name).await?;
        } else if cfg.tls == RelayTls::Require {
            return Err(RelayError::Policy(
                "next hop does not offer STARTTLS (tls = \"require\")",
            ));
        }

        match (&cfg.xclient, conn.caps.xclient.clone()) {
            (XclientMode::Off, _) => {}
            (_, Some(attrs)) => conn.announce(client, &attrs, our_name).await?,
            (XclientMode::Require, None) => {
                conn.quit().await;
                return Err(RelayError::Policy(
                    "next hop does not offer XCLIENT (xclient = \"require\"): it would see our address, not the client's",
                ));
            }
            (XclientMode::Auto, None) => {
                // Without XCLIENT the next hop judges *us*. That is only safe when it
                // treats us as any other unauthenticated client: ask it.
                if let Err(why) = conn.probe_relay_trust().await {
                    tracing::error!(next_hop = %format!("{host}:{port}"), reason = %why,
                        "next hop does not offer XCLIENT and trusts our address: refusing to relay through it (it would relay for anyone); authorize XCLIENT for us (smtpd_authorized_xclient_hosts) or stop trusting our address (mynetworks)");
                    crate::metrics::global().relay_unsafe_next_hop.inc();
                    conn.quit().await;
                    return Err(RelayError::Policy(
                        "next hop trusts our address and does not offer XCLIENT (open relay)",
                    ));
                }
                note_relay_without_xclient(format_args!("{host}:{port}"));
            }
        }
        Ok(conn)
    }

    /// XCLIENT with `client`'s attributes, then EHLO as the client. XCLIENT starts a new
    /// SMTP session at the next hop (Postfix semantics), so this is also how a pooled
    /// connection is handed to another client session.
    async fn announce(
        &mut self,
        client: &ClientIdentity,
        offered: &[String],
        our_name: &str,
    ) -> Result<(), RelayError> {
        self.xclient_sent = false;
        if client.login.is_some() {
            self.reusable = false;
        }
        for line in xclient::commands(client, offered) {
            let reply = self
                .command(line.as_bytes(), self.cfg.command_timeout)
                .await?;
            if reply.code != 220 {
                return Err(RelayError::Rejected(reply));
            }
        }
        self.xclient_sent = true;
        self.in_transaction = false;
        // Greet with the client's own HELO name so the next hop's HELO checks and its
        // Received line see it, not ours (XCLIENT_README).
        let name = client
            .helo
            .as_deref()
            .filter(|h| is_helo_token(h))
            .unwrap_or(our_name);
        self.ehlo(name).await
    }

    /// Readies a connection taken from the pool for `client`'s session: XCLIENT for this
    /// client and EHLO as it when the next hop offers XCLIENT (and it is not off), so the
    /// next hop never applies one client's identity to another's mail. The connection
    /// was in no transaction when it was parked. Without XCLIENT (`auto`, not offered) the next hop
    /// already judged this connection by our own address when it was opened (the relay
    /// probe), so nothing is sent.
    pub async fn rebind(
        &mut self,
        client: &ClientIdentity,
        our_name: &str,
    ) -> Result<(), RelayError> {
        match (&self.cfg.xclient, self.caps.xclient.clone()) {
            (XclientMode::Off, _) => Ok(()),
            (_, Some(attrs)) => self.announce(client, &attrs, our_name).await,
            (XclientMode::Require, None) => Err(RelayError::Policy(
                "next hop does not offer XCLIENT (xclient = \"require\")",
            )),
            (XclientMode::Auto, None) => {
                note_relay_without_xclient(self.peer);
                Ok(())
            }
        }
    }

    /// Whether the connection is still usable after sitting idle (see
    /// [`SmtpStream::is_quiet`]).
    pub fn is_quiet(&mut self) -> bool {
        self.stream.is_quiet()
    }

    /// Asks the next hop whether it would relay for us as we are (no XCLIENT, no AUTH):
    /// `MAIL FROM:<>`, `RCPT TO:` an address in a domain that can never be local
    /// (RFC 2606 `.invalid`), `RSET`. A refusal with a security status (x.7.x, Postfix's
    /// "Relay access denied") means it treats us as an outside client: safe. Acceptance
    /// means it trusts our address (`mynetworks`): every client would inherit that
    /// trust. Any other answer cannot tell, so it counts as unsafe (fail closed).
    async fn probe_relay_trust(&mut self) -> Result<(), String> {
        let timeout = self.cfg.command_timeout;
        let mail = self
            .command(b"MAIL FROM:<>\r\n", timeout)
            .await
            .map_err(|e| format!("relay probe MAIL: {e}"))?;
        if !mail.is_positive() {
            return Err(format!("relay probe MAIL answered {}", mail.summary()));
        }
        let rcpt = self
            .command(
                format!("RCPT TO:<{RELAY_PROBE_RCPT}>\r\n").as_bytes(),
                timeout,
            )
            .await
            .map_err(|e| format!("relay probe RCPT: {e}"))?;
        let rset = self
            .command(b"RSET\r\n", timeout)
            .await
            .map_err(|e| format!("relay probe RSET: {e}"))?;
        if rset.code != 250 {
            return Err(format!("relay probe RSET answered {}", rset.summary()));
        }
        match rcpt.enhanced {
            _ if rcpt.is_positive() => Err(format!(
                "it accepted a recipient in another domain from us: {}",
                rcpt.summary()
            )),
            Some(crate::wire::reply::Enhanced(4 | 5, 7, _)) => Ok(()),
            _ => Err(format!(
                "cannot tell from its answer to a foreign recipient: {}",
                rcpt.summary()
            )),
        }
    }

    async fn expect_greeting(&mut self) -> Result<(), RelayError> {
        let reply = self.read_reply(self.cfg.greeting_timeout).await?;
        if reply.code != 220 {
            return Err(RelayError::Rejected(reply));
        }
        Ok(())
    }

    async fn ehlo(&mut self, our_name: &str) -> Result<(), RelayError> {
        let reply = self
            .command(
                format!("EHLO {our_name}\r\n").as_bytes(),
                self.cfg.command_timeout,
            )
            .await?;
        if reply.code != 250 {
            return Err(RelayError::Rejected(reply));
        }
        self.caps = Capabilities::from_ehlo(&reply);
        Ok(())
    }

    async fn starttls(
        &mut self,
        host: &str,
        client: Option<&crate::tls::RelayTlsClient>,
    ) -> Result<(), RelayError> {
        let client = client.ok_or(RelayError::Policy("no TLS client configuration"))?;
        let reply = self
            .command(b"STARTTLS\r\n", self.cfg.command_timeout)
            .await?;
        if reply.code != 220 {
            if self.cfg.tls == RelayTls::Require {
                return Err(RelayError::Rejected(reply));
            }
            return Ok(());
        }
        // Bytes the next hop sent after its 220 and before the handshake are dropped
        // with the old buffer (the downstream half of CVE-2011-0411).
        let old = std::mem::replace(&mut self.stream, SmtpStream::new(MaybeTls::Detached));
        let MaybeTls::Plain(tcp) = old.into_inner_discarding_input() else {
            return Err(RelayError::Protocol(
                "STARTTLS on a stream that is not plain TCP".into(),
            ));
        };
        let name = crate::tls::server_name(host).map_err(RelayError::Tls)?;
        let tls = tokio::time::timeout(
            self.cfg.command_timeout,
            client.connector.connect(name, tcp),
        )
        .await
        .map_err(|_| RelayError::Timeout("TLS handshake"))?
        .map_err(|e| RelayError::Tls(e.to_string()))?;
        self.stream = SmtpStream::new(MaybeTls::Tls(Box::new(tls)));
        self.tls_verified = client.verifies;
        Ok(())
    }

    /// MAIL FROM with the ESMTP parameters the next hop supports.
    pub async fn mail(
        &mut self,
        from: &MailFrom<String>,
        size: usize,
    ) -> Result<Reply, RelayError> {
        if !self.caps.smtputf8
            && (from.flags & smtp_proto::MAIL_SMTPUTF8 != 0 || !from.address.is_ascii())
        {
            return Ok(Reply::next_hop_lacks_smtputf8());
        }
        let line = mail_command(from, &self.caps, size);
        let reply = self
            .command(line.as_bytes(), self.cfg.command_timeout)
            .await?;
        self.in_transaction = reply.is_positive();
        Ok(reply)
    }

    pub async fn rcpt(&mut self, to: &RcptTo<String>) -> Result<Reply, RelayError> {
        if !self.caps.smtputf8 && !to.address.is_ascii() {
            return Ok(Reply::next_hop_lacks_smtputf8());
        }
        let line = rcpt_command(to, &self.caps);
        self.command(line.as_bytes(), self.cfg.command_timeout)
            .await
    }

    /// MAIL and the transaction's first RCPT. When the next hop offers PIPELINING they go
    /// out in one write and both replies are read (RFC 2920 §3.1: MAIL and RCPT may be
    /// grouped): one round trip and one system call each way fewer per message than in
    /// lockstep. Otherwise MAIL, then RCPT if MAIL was accepted.
    ///
    /// Returns the MAIL reply and the RCPT result: `None` when RCPT was not sent (MAIL
    /// refused in lockstep). When MAIL was refused in a pipelined group, the RCPT answer
    /// that follows (the next hop's "need MAIL" or similar) is still read, so the
    /// connection stays in step; it is not the client's answer.
    pub async fn mail_rcpt(
        &mut self,
        from: &MailFrom<String>,
        size: usize,
        to: &RcptTo<String>,
    ) -> Result<(Reply, Option<Result<Reply, RelayError>>), RelayError> {
        // What `mail` or `rcpt` would refuse without asking goes the lockstep way, so
        // those refusals stay in one place.
        let needs_utf8 = from.flags & smtp_proto::MAIL_SMTPUTF8 != 0
            || !from.address.is_ascii()
            || !to.address.is_ascii();
        let lockstep = !self.caps.pipelining || (needs_utf8 && !self.caps.smtputf8);
        if lockstep {
            let mail = self.mail(from, size).await?;
            if !mail.is_positive() {
                return Ok((mail, None));
            }
            return Ok((mail, Some(self.rcpt(to).await)));
        }
        let mut group = mail_command(from, &self.caps, size);
        group.push_str(&rcpt_command(to, &self.caps));
        let timeout = self.cfg.command_timeout;
        self.write(group.as_bytes(), timeout).await?;
        let mail = self.read_reply(timeout).await?;
        self.in_transaction = mail.is_positive();
        let rcpt = self.read_reply(timeout).await;
        Ok((mail, Some(rcpt)))
    }

    /// Sends the message (`headers` added on top of `parts`) and returns the next hop's
    /// answer to it: in one `BDAT <size> LAST` when the next hop offers CHUNKING, else
    /// with DATA. Either way the content goes out with vectored writes straight from the
    /// message buffer.
    pub async fn send_message(
        &mut self,
        headers: &[String],
        parts: &[&[u8]],
    ) -> Result<Reply, RelayError> {
        if self.caps.chunking {
            self.bdat(&Encoded::framed(headers, parts, Framing::Chunk))
                .await
        } else {
            self.data(&Encoded::framed(headers, parts, Framing::Data))
                .await
        }
    }

    /// DATA, the encoded content, and the final reply. A 354 is the only acceptable
    /// answer to DATA: a 250 there is a protocol violation, not success.
    async fn data(&mut self, encoded: &Encoded<'_>) -> Result<Reply, RelayError> {
        let reply = self.command(b"DATA\r\n", self.cfg.command_timeout).await?;
        match reply.code {
            354 => {}
            // The transaction stays open at the next hop (`in_transaction`): the next
            // one begins with RSET.
            c if c >= 400 => return Ok(reply),
            _ => {
                return Err(RelayError::Protocol(format!(
                    "unexpected reply to DATA: {reply}"
                )));
            }
        }
        self.write_content(&mut encoded.io_slices()).await?;
        let reply = self.final_reply().await?;
        // Accepted or not, the answer to the end of data ends the transaction.
        self.in_transaction = false;
        Ok(reply)
    }

    /// The whole message as one last chunk: the command and the content in one vectored
    /// write, then one answer. This saves the DATA round trip (issue 18). The size is
    /// the framing, so nothing in the content can end it early or be read as a command.
    async fn bdat(&mut self, encoded: &Encoded<'_>) -> Result<Reply, RelayError> {
        let command = format!("BDAT {} LAST\r\n", encoded.size());
        let mut slices = vec![std::io::IoSlice::new(command.as_bytes())];
        slices.extend(encoded.io_slices());
        self.write_content(&mut slices).await?;
        let reply = self.final_reply().await?;
        // RFC 3030 §2: a refused chunk leaves the transaction to be cleared with RSET,
        // which the next transaction on this connection then begins with.
        self.in_transaction = !reply.is_positive();
        Ok(reply)
    }

    async fn write_content(
        &mut self,
        slices: &mut [std::io::IoSlice<'_>],
    ) -> Result<(), RelayError> {
        self.stream
            .write_all_vectored(slices, self.cfg.data_timeout)
            .await
            .map_err(|e| match e.kind() {
                std::io::ErrorKind::TimedOut => RelayError::Timeout("write"),
                _ => RelayError::Io(e),
            })
    }

    /// The answer to the whole message. Without it we cannot know whether the next hop
    /// took the message: the error says so (`Unsettled`).
    async fn final_reply(&mut self) -> Result<Reply, RelayError> {
        self.read_reply(self.cfg.end_of_data_timeout)
            .await
            .map_err(|e| RelayError::Unsettled(Box::new(e)))
    }

    /// Whether the connection to the next hop is encrypted.
    pub fn is_tls(&self) -> bool {
        self.stream.get_ref().is_tls()
    }

    /// How this connection is protected, for [`super::may_send_credentials`].
    pub fn link(&self) -> super::Link {
        match (self.stream.get_ref().is_tls(), self.tls_verified) {
            (true, true) => super::Link::VerifiedTls,
            (true, false) => super::Link::UnverifiedTls,
            (false, _) => super::Link::Plain,
        }
    }

    /// The address this connection reached.
    pub fn peer(&self) -> std::net::SocketAddr {
        self.peer
    }

    /// Authenticates at the next hop with the client's credentials (PLAIN when offered,
    /// else LOGIN). The next hop checks the password; we only pass it on. Returns the
    /// next hop's final reply (235 on success).
    pub async fn authenticate(&mut self, creds: &super::Credentials) -> Result<Reply, RelayError> {
        use base64::Engine;
        // Checked here, where the password is written, so no caller can skip it.
        super::may_send_credentials(self.peer, self.link()).map_err(RelayError::Insecure)?;
        self.reusable = false;
        let b64 = |s: &[u8]| base64::engine::general_purpose::STANDARD.encode(s);
        let timeout = self.cfg.command_timeout;
        if self.caps.auth.iter().any(|m| m == "PLAIN") {
            let mut blob = Vec::new();
            blob.extend_from_slice(creds.authzid.as_bytes());
            blob.push(0);
            blob.extend_from_slice(creds.username.as_bytes());
            blob.push(0);
            blob.extend_from_slice(creds.password.as_bytes());
            let line = format!("AUTH PLAIN {}\r\n", b64(&blob));
            return self.command(line.as_bytes(), timeout).await;
        }
        if self.caps.auth.iter().any(|m| m == "LOGIN") {
            for step in [
                "AUTH LOGIN\r\n".to_string(),
                format!("{}\r\n", b64(creds.username.as_bytes())),
            ] {
                let reply = self.command(step.as_bytes(), timeout).await?;
                if reply.code != 334 {
                    return Ok(reply);
                }
            }
            let line = format!("{}\r\n", b64(creds.password.as_bytes()));
            return self.command(line.as_bytes(), timeout).await;
        }
        Err(RelayError::Policy(
            "next hop offers neither AUTH PLAIN nor AUTH LOGIN",
        ))
    }

    pub async fn rset(&mut self) -> Result<Reply, RelayError> {
        let reply = self.command(b"RSET\r\n", self.cfg.command_timeout).await?;
        if reply.code == 250 {
            self.in_transaction = false;
        }
        Ok(reply)
    }

    /// Says QUIT and closes, without waiting long: the transaction is already settled.
    pub async fn quit(mut self) {
        let _ = tokio::time::timeout(Duration::from_secs(5), async {
            let _ = self.command(b"QUIT\r\n", Duration::from_secs(5)).await;
            self.stream.shutdown().await;
        })
        .await;
    }

    async fn write(&mut self, bytes: &[u8], timeout: Duration) -> Result<(), RelayError> {
        tokio::time::timeout(timeout, self.stream.write_raw(bytes))
            .await
            .map_err(|_| RelayError::Timeout("write"))?
            .map_err(RelayError::Io)
    }

    async fn command(&mut self, line: &[u8], timeout: Duration) -> Result<Reply, RelayError> {
        debug_assert!(line.ends_with(b"\r\n") && line.len() <= 8192);
        self.write(line, timeout).await?;
        self.read_reply(timeout).await
    }

    /// Reads one (multi-line) reply, bounded in line length, line count and time.
    async fn read_reply(&mut self, timeout: Duration) -> Result<Reply, RelayError> {
        let deadline = tokio::time::Instant::now() + timeout;
        let mut lines = Vec::with_capacity(1);
        loop {
            let left = deadline.saturating_duration_since(tokio::time::Instant::now());
            let line = match self.stream.read_line(MAX_RELAY_REPLY_LINE, left).await {
                Ok(Line::Complete(l)) => l,
                Ok(Line::TooLong) => {
                    return Err(RelayError::Protocol("reply line too long".into()));
                }
                Err(ReadError::Timeout) => return Err(RelayError::Timeout("reply")),
                Err(ReadError::Closed) => return Err(RelayError::Closed),
                Err(ReadError::Io(e)) => return Err(RelayError::Io(e)),
            };
            let mut text = String::from_utf8(line)
                .unwrap_or_else(|e| String::from_utf8_lossy(e.as_bytes()).into_owned());
            text.truncate(text.trim_end_matches(['\r', '\n']).len());
            let last = reply::is_last_line(&text);
            lines.push(text);
            if last {
                break;
            }
            if lines.len() >= MAX_RELAY_REPLY_LINES {
                return Err(RelayError::Protocol("reply has too many lines".into()));
            }
        }
        Reply::from_lines(&lines).ok_or_else(|| {
            RelayError::Protocol(format!("malformed reply: {:?}", reply::sanitize(&lines[0])))
        })
    }
}

/// An address as RFC 5321 writes it: a local part that is not a plain dot-atom (it had
/// quotes on the way in: spaces, `>`, `@`, …) is quoted again, so it can never be read
/// as the end of the path or as parameters by the next hop.
pub fn smtp_path(address: &str) -> String {
    if address.is_empty() {
        return String::new(); // the null reverse path <>
    }
    let Some((local, domain)) = address.rsplit_once('@') else {
        return quote_if_needed(address);
    };
    format!("{}@{}", quote_if_needed(local), domain)
}

fn quote_if_needed(local: &str) -> String {
    let atext =
        |c: char| c.is_ascii_alphanumeric() || "!#$%&'*+-/=?^_`{|}~".contains(c) || !c.is_ascii();
    let dot_atom = !local.is_empty()
        && !local.starts_with('.')
        && !local.ends_with('.')
        && !local.contains("..")
        && local.chars().all(|c| c == '.' || atext(c));
    if dot_atom {
        return local.to_string();
    }
    let mut q = String::with_capacity(local.len() + 2);
    q.push('"');
    for c in local.chars() {
        if c == '"' || c == '\\' {
            q.push('\\');
        }
        q.push(c);
    }
    q.push('"');
    q
}

/// A HELO argument we can repeat in our own EHLO: one printable token, not too long.
fn is_helo_token(h: &str) -> bool {
    !h.is_empty() && h.len() <= 255 && h.bytes().all(|b| b.is_ascii_graphic())
}

/// Builds `MAIL FROM:<addr> [params]` keeping only what the next hop supports.
pub fn mail_command(from: &MailFrom<String>, caps: &Capabilities, size: usize) -> String {
    use smtp_proto::*;
    let mut line = format!("MAIL FROM:<{}>", smtp_path(&from.address));
    if caps.size.is_some() && size > 0 {
        line.push_str(&format!(" SIZE={size}"));
    }
    if caps.eight_bit_mime {
        if from.flags & MAIL_BODY_8BITMIME != 0 {
            line.push_str(" BODY=8BITMIME");
        } else if from.flags & MAIL_BODY_7BIT != 0 {
            line.push_str(" BODY=7BIT");
        }
    }
    if caps.smtputf8 && from.flags & MAIL_SMTPUTF8 != 0 {
        line.push_str(" SMTPUTF8");
    }
    if caps.dsn {
        if from.flags & MAIL_RET_FULL != 0 {
            line.push_str(" RET=FULL");
        } else if from.flags & MAIL_RET_HDRS != 0 {
            line.push_str(" RET=HDRS");
        }
        if let Some(envid) = &from.env_id {
            line.push_str(&format!(" ENVID={}", xclient::xtext(envid)));
        }
    }
    line.push_str("\r\n");
    line
}

/// Builds `RCPT TO:<addr> [params]` keeping only what the next hop supports.
pub fn rcpt_command(to: &RcptTo<String>, caps: &Capabilities) -> String {
    use smtp_proto::*;
    let mut line = format!("RCPT TO:<{}>", smtp_path(&to.address));
    if caps.dsn {
        let notify: Vec<&str> = [
            (RCPT_NOTIFY_SUCCESS, "SUCCESS"),
            (RCPT_NOTIFY_FAILURE, "FAILURE"),
            (RCPT_NOTIFY_DELAY, "DELAY"),
            (RCPT_NOTIFY_NEVER, "NEVER"),
        ]
        .iter()
        .filter(|(flag, _)| to.flags & flag != 0)
        .map(|(_, name)| *name)
        .collect();
        if !notify.is_empty() {
            line.push_str(&format!(" NOTIFY={}", notify.join(",")));
        }
        if let Some(orcpt) = &to.orcpt {
            // smtp-proto keeps only the address of `ORCPT=rfc822;addr` (decoded).
            line.push_str(&format!(" ORCPT=rfc822;{}", xclient::xtext(orcpt)));
        }
    }
    line.push_str("\r\n");
    line
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse_mail(line: &str) -> MailFrom<String> {
        match smtp_proto::Request::parse(&mut line.as_bytes().iter()).unwrap() {
            smtp_proto::Request::Mail { from } => from.into_owned(),
            other => panic!("{other:?}"),
        }
    }

    fn parse_rcpt(line: &str) -> RcptTo<String> {
        match smtp_proto::Request::parse(&mut line.as_bytes().iter()).unwrap() {
            smtp_proto::Request::Rcpt { to } => to.into_owned(),
            other => panic!("{other:?}"),
        }
    }

    fn all_caps() -> Capabilities {
        Capabilities {
            size: Some(0),
            eight_bit_mime: true,
            smtputf8: true,
            dsn: true,
            ..Default::default()
        }
    }

    #[test]
    fn esmtp_parameters_round_trip() {
        let from = parse_mail(
            "MAIL FROM:<a@b.example> SIZE=100 BODY=8BITMIME SMTPUTF8 RET=HDRS ENVID=QQ+2B1\r\n",
        );
        assert_eq!(
            mail_command(&from, &all_caps(), 120),
            "MAIL FROM:<a@b.example> SIZE=120 BODY=8BITMIME SMTPUTF8 RET=HDRS ENVID=QQ+2B1\r\n"
        );
        // A next hop without the extensions gets none of the parameters.
        assert_eq!(
            mail_command(&from, &Capabilities::default(), 120),
            "MAIL FROM:<a@b.example>\r\n"
        );
        let null = parse_mail("MAIL FROM:<>\r\n");
        assert_eq!(
            mail_command(&null, &Capabilities::default(), 0),
            "MAIL FROM:<>\r\n"
        );
        let to = parse_rcpt(
            "RCPT TO:<c@d.example> NOTIFY=SUCCESS,FAILURE ORCPT=rfc822;c+2Bx@d.example\r\n",
        );
        assert_eq!(
            rcpt_command(&to, &all_caps()),
            "RCPT TO:<c@d.example> NOTIFY=SUCCESS,FAILURE ORCPT=rfc822;c+2Bx@d.example\r\n"
        );
    }

    #[test]
    fn quoted_local_parts_stay_quoted() {
        assert_eq!(smtp_path("a.b@x.example"), "a.b@x.example");
        assert_eq!(
            smtp_path("y@other.example> ORCPT=rfc822;x@example.org"),
            "\"y@other.example> ORCPT=rfc822;x\"@example.org"
        );
        assert_eq!(smtp_path("f g@y.example"), "\"f g\"@y.example");
        assert_eq!(smtp_path("a\"b@y.example"), "\"a\\\"b\"@y.example");
        assert_eq!(smtp_path(""), "");
        assert_eq!(smtp_path("postmaster"), "postmaster");
    }

    #[test]
    fn capabilities_from_ehlo() {
        let r = Reply::plain(
            250,
            vec![
                "mx".into(),
                "SIZE 1000".into(),
                "xclient NAME ADDR HELO".into(),
                "STARTTLS".into(),
            ],
        );
        let c = Capabilities::from_ehlo(&r);
        assert_eq!(c.size, Some(1000));
        assert!(c.starttls);
        assert_eq!(c.xclient.unwrap(), vec!["NAME", "ADDR", "HELO"]);
    }
}
