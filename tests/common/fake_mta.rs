//! A scriptable next-hop SMTP server (an smtp-sink-like fake MTA) on loopback.
//!
//! The [`Script`] decides, per verb, what the fake answers; it is read afresh for every
//! command, so a test can change behaviour between transactions with
//! [`FakeMta::set_script`] / [`FakeMta::update`]. The fake records the full raw byte
//! transcript of each connection (what the next hop actually received, plaintext after
//! a STARTTLS), the XCLIENT attributes, and every message received (bytes between 354
//! and the final dot, de-dot-stuffed, with the envelope).
#![allow(dead_code)]

use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::net::TcpListener;
use tokio::task::JoinHandle;

use super::{Stream, free_addr, server_tls_config, show};

/// What the fake does at one step.
#[derive(Clone, Debug)]
pub enum Act {
    /// Send this reply. Multi-line replies: lines separated by '\n' (each sent with CRLF),
    /// e.g. "250-first\n250 last".
    Reply(String),
    /// Send these exact bytes.
    Raw(Vec<u8>),
    /// Close the connection without replying.
    Disconnect,
    /// Never reply: keep reading (and recording) until the peer closes.
    Hang,
    /// Wait, then act.
    Delay(Duration, Box<Act>),
}

impl Act {
    pub fn reply(s: &str) -> Act {
        Act::Reply(s.to_string())
    }
    pub fn raw(b: &[u8]) -> Act {
        Act::Raw(b.to_vec())
    }
    pub fn delay(d: Duration, a: Act) -> Act {
        Act::Delay(d, Box::new(a))
    }
    /// The code of the final reply this act sends, if it is a reply.
    fn code(&self) -> Option<u16> {
        match self {
            Act::Reply(s) => s
                .lines()
                .last()
                .and_then(|l| l.get(..3))
                .and_then(|c| c.parse().ok()),
            Act::Delay(_, a) => a.code(),
            _ => None,
        }
    }
}

#[derive(Clone, Debug)]
pub struct Script {
    pub greeting: Act,
    /// EHLO keywords after the first line (the hostname).
    pub caps: Vec<String>,
    /// Override the whole EHLO answer.
    pub ehlo: Option<Act>,
    pub helo: Act,
    /// Reply to XCLIENT (Postfix: 220 greeting, then the client must EHLO again).
    pub xclient: Act,
    /// Reply to STARTTLS; a 220 reply is followed by the TLS handshake.
    pub starttls: Act,
    /// Bytes the fake appends right after its STARTTLS 220 (downstream injection test).
    pub starttls_inject: Option<Vec<u8>>,
    /// The certificate the fake presents after STARTTLS; `None`: certs/test-server.crt.
    pub tls_server: Option<Arc<rustls::ServerConfig>>,
    pub mail: Act,
    /// Default reply to RCPT.
    pub rcpt: Act,
    /// Per-recipient replies: (substring of the lower-cased RCPT argument, act).
    pub rcpt_by_addr: Vec<(String, Act)>,
    /// Reply to DATA; the fake reads message content only if this is a 354 reply.
    pub data: Act,
    /// Close the connection as soon as any message content arrives.
    pub disconnect_mid_data: bool,
    /// Close the connection (unread bytes pending, so the peer sees a reset) as soon as
    /// the message content received so far contains one of these substrings, before
    /// its end (a per-message [`Script::disconnect_mid_data`]).
    pub disconnect_mid_data_if: Vec<String>,
    /// Reply to the end of data.
    pub eod: Act,
    /// End-of-data replies chosen by content: (substring of the message, act).
    pub eod_by_content: Vec<(String, Act)>,
    pub rset: Act,
    /// Also end DATA at `\n.\n`, `\n.\r\n`, `\r\n.\n`, `\r.\r\n`, `\r.\r` (like MTAs
    /// vulnerable to SMTP smuggling), so non-canonical output shows up as extra messages.
    pub lenient_data_end: bool,
    /// Postfix-like relay restrictions applied to RCPT (see [`RelayRules`]); `None`: every
    /// recipient gets the scripted answer.
    pub relay_rules: Option<RelayRules>,
}

/// What a Postfix next hop with `smtpd_relay_restrictions = permit_mynetworks,
/// permit_sasl_authenticated, reject_unauth_destination` decides at RCPT: a recipient in
/// `local_domains` gets the scripted answer; any other recipient only when the client
/// (the XCLIENT `ADDR` if one was sent, else the TCP peer: the proxy itself) is in
/// `mynetworks`, or the session is authenticated (a successful AUTH on this connection,
/// or an XCLIENT `LOGIN`). Otherwise `554 5.7.1 Relay access denied`.
#[derive(Clone, Debug, Default)]
pub struct RelayRules {
    pub local_domains: Vec<String>,
    /// IPv4 networks, `"a.b.c.d/len"` (or a bare address).
    pub mynetworks: Vec<String>,
}

impl RelayRules {
    fn in_mynetworks(&self, ip: std::net::IpAddr) -> bool {
        let std::net::IpAddr::V4(ip) = ip else {
            return false;
        };
        self.mynetworks.iter().any(|n| {
            let (net, len) = n.split_once('/').unwrap_or((n.as_str(), "32"));
            let (Ok(net), Ok(len)) = (net.parse::<std::net::Ipv4Addr>(), len.parse::<u32>()) else {
                return false;
            };
            let mask = if len == 0 {
                0
            } else {
                u32::MAX << (32 - len.min(32))
            };
            u32::from(ip) & mask == u32::from(net) & mask
        })
    }
}

pub fn default_caps() -> Vec<String> {
    [
        "PIPELINING",
        "SIZE 52428800",
        "8BITMIME",
        "SMTPUTF8",
        "ENHANCEDSTATUSCODES",
        "DSN",
        "XCLIENT NAME ADDR PORT PROTO HELO LOGIN DESTADDR DESTPORT",
    ]
    .iter()
    .map(|s| s.to_string())
    .collect()
}

impl Default for Script {
    fn default() -> Self {
        Script {
            greeting: Act::reply("220 fake.mta.test ESMTP fake"),
            caps: default_caps(),
            ehlo: None,
            helo: Act::reply("250 fake.mta.test"),
            xclient: Act::reply("220 fake.mta.test ESMTP fake"),
            starttls: Act::reply("220 2.0.0 Ready to start TLS"),
            starttls_inject: None,
            tls_server: None,
            mail: Act::reply("250 2.1.0 Ok"),
            rcpt: Act::reply("250 2.1.5 Ok"),
            rcpt_by_addr: vec![],
            data: Act::reply("354 End data with <CR><LF>.<CR><LF>"),
            disconnect_mid_data: false,
            disconnect_mid_data_if: vec![],
            eod: Act::reply("250 2.0.0 Ok: queued as FAKE1"),
            eod_by_content: vec![],
            rset: Act::reply("250 2.0.0 Ok"),
            lenient_data_end: false,
            relay_rules: None,
        }
    }
}

impl Script {
    pub fn with_starttls(mut self) -> Self {
        self.caps.push("STARTTLS".into());
        self
    }
    pub fn without_cap(mut self, kw: &str) -> Self {
        self.caps.retain(|c| {
            !c.split_whitespace()
                .next()
                .is_some_and(|w| w.eq_ignore_ascii_case(kw))
        });
        self
    }
}

/// One connection the fake accepted.
#[derive(Clone, Debug, Default)]
pub struct ConnRecord {
    pub id: usize,
    /// Every byte received on this connection (decrypted after STARTTLS).
    pub transcript: Vec<u8>,
    /// Command lines received (CRLF stripped; message content excluded).
    pub commands: Vec<String>,
    /// XCLIENT attributes, one Vec per XCLIENT command, names upper-cased.
    pub xclient: Vec<Vec<(String, String)>>,
    pub tls: bool,
    pub closed: bool,
    /// The TCP peer of this connection (the proxy's address).
    pub peer: Option<SocketAddr>,
}

impl ConnRecord {
    /// Value of an XCLIENT attribute (the last one sent on this connection wins).
    pub fn xclient_attr(&self, name: &str) -> Option<String> {
        self.xclient
            .iter()
            .rev()
            .flat_map(|attrs| attrs.iter().rev())
            .find(|(k, _)| k.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.clone())
    }
    /// Verbs (first word, upper-cased) of the commands in order.
    pub fn verbs(&self) -> Vec<String> {
        self.commands
            .iter()
            .map(|c| {
                c.split_whitespace()
                    .next()
                    .unwrap_or("")
                    .to_ascii_uppercase()
            })
            .collect()
    }
}

/// One message whose content the fake received completely (up to the final dot).
#[derive(Clone, Debug)]
pub struct Message {
    pub conn: usize,
    /// The full MAIL command line, e.g. "MAIL FROM:<a@b> SIZE=12".
    pub mail: String,
    /// The RCPT command lines the fake accepted (2xx).
    pub rcpts: Vec<String>,
    /// Content as received on the wire (still dot-stuffed, without the final ".\r\n").
    pub raw: Vec<u8>,
    /// Content after removing dot-stuffing.
    pub data: Vec<u8>,
    /// True when the fake answered the end of data with 2xx.
    pub accepted: bool,
    pub xclient: Option<Vec<(String, String)>>,
}

impl Message {
    /// Reverse path from the MAIL line ("" for the null sender).
    pub fn sender(&self) -> String {
        angle_addr(&self.mail)
    }
    pub fn rcpt_addrs(&self) -> Vec<String> {
        self.rcpts.iter().map(|l| angle_addr(l)).collect()
    }
    /// ESMTP parameters after the path, upper-cased keywords: "SIZE=12" etc.
    pub fn mail_params(&self) -> Vec<String> {
        params_after_path(&self.mail)
    }
    pub fn data_str(&self) -> String {
        show(&self.data)
    }
}

pub fn angle_addr(line: &str) -> String {
    match (line.find('<'), line.find('>')) {
        (Some(a), Some(b)) if b > a => line[a + 1..b].to_string(),
        _ => String::new(),
    }
}

pub fn params_after_path(line: &str) -> Vec<String> {
    match line.find('>') {
        Some(i) => line[i + 1..]
            .split_whitespace()
            .map(str::to_string)
            .collect(),
        None => vec![],
    }
}

#[derive(Default)]
struct State {
    script: Option<Script>,
    conns: Vec<ConnRecord>,
    messages: Vec<Message>,
    /// AUTH: the (user, password) pairs accepted (see the end of this file).
    auth_users: Vec<(String, String)>,
    auth_attempts: Vec<AuthAttempt>,
    /// Connection tasks, so [`FakeMta::crash`] can end them all at once.
    conn_tasks: Vec<tokio::task::AbortHandle>,
}

type Shared = Arc<Mutex<State>>;

pub struct FakeMta {
    pub addr: SocketAddr,
    state: Shared,
    task: JoinHandle<()>,
}

impl Drop for FakeMta {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl FakeMta {
    pub async fn start(script: Script) -> FakeMta {
        let listener = TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind fake MTA");
        Self::from_listener(listener, script)
    }

    fn from_listener(listener: TcpListener, script: Script) -> FakeMta {
        let addr = listener.local_addr().unwrap();
        let state: Shared = Arc::new(Mutex::new(State {
            script: Some(script),
            ..Default::default()
        }));
        let st = state.clone();
        let task = tokio::spawn(async move {
            loop {
                let Ok((tcp, peer)) = listener.accept().await else {
                    continue;
                };
                let st = st.clone();
                let st2 = st.clone();
                let handle = tokio::spawn(async move {
                    let id = {
                        let mut g = st.lock().unwrap();
                        let id = g.conns.len();
                        g.conns.push(ConnRecord {
                            id,
                            peer: Some(peer),
                            ..Default::default()
                        });
                        id
                    };
                    let mut conn = Conn {
                        st: st.clone(),
                        id,
                        io: Stream::Plain(tcp),
                        buf: Vec::new(),
                    };
                    conn.run().await;
                    conn.io.shutdown().await;
                    st.lock().unwrap().conns[id].closed = true;
                });
                let mut g = st2.lock().unwrap();
                g.conn_tasks.retain(|h| !h.is_finished());
                g.conn_tasks.push(handle.abort_handle());
            }
        });
        FakeMta { addr, state, task }
    }

    /// Start on a specific address (e.g. one that refused connections earlier).
    pub async fn start_at(addr: SocketAddr, script: Script) -> FakeMta {
        let listener = TcpListener::bind(addr)
            .await
            .expect("bind fake MTA at addr");
        Self::from_listener(listener, script)
    }

    /// Like [`FakeMta::start_at`], retrying for up to `within` while the port is still
    /// taken (a restart on the same port: the old socket may linger briefly).
    pub async fn restart_at(addr: SocketAddr, script: Script, within: Duration) -> FakeMta {
        let deadline = tokio::time::Instant::now() + within;
        loop {
            match TcpListener::bind(addr).await {
                Ok(l) => return Self::from_listener(l, script),
                Err(e) if tokio::time::Instant::now() > deadline => {
                    panic!("cannot bind the fake MTA again at {addr}: {e}")
                }
                Err(_) => tokio::time::sleep(Duration::from_millis(50)).await,
            }
        }
    }

    /// Simulates a crash of the MTA process: stops listening and drops every open
    /// connection at once, wherever it is in its dialogue. What was recorded so far
    /// stays readable. (Dropping a `FakeMta` only stops the listener.)
    pub fn crash(&self) {
        self.task.abort();
        for h in self.state.lock().unwrap().conn_tasks.drain(..) {
            h.abort();
        }
    }

    /// An address where nothing listens (connection refused).
    pub fn refused_addr() -> SocketAddr {
        free_addr()
    }

    pub fn url(&self) -> String {
        format!("smtp://{}", self.addr)
    }

    pub fn set_script(&self, s: Script) {
        self.state.lock().unwrap().script = Some(s);
    }

    pub fn update(&self, f: impl FnOnce(&mut Script)) {
        let mut g = self.state.lock().unwrap();
        f(g.script.as_mut().unwrap());
    }

    pub fn connection_count(&self) -> usize {
        self.state.lock().unwrap().conns.len()
    }

    pub fn conns(&self) -> Vec<ConnRecord> {
        self.state.lock().unwrap().conns.clone()
    }

    /// All messages whose content was completely received.
    pub fn messages(&self) -> Vec<Message> {
        self.state.lock().unwrap().messages.clone()
    }

    /// Messages the fake answered 2xx at end of data (i.e. delivered).
    pub fn accepted(&self) -> Vec<Message> {
        self.messages().into_iter().filter(|m| m.accepted).collect()
    }

    /// All bytes received on all connections, concatenated.
    pub fn all_bytes(&self) -> Vec<u8> {
        let g = self.state.lock().unwrap();
        g.conns.iter().flat_map(|c| c.transcript.clone()).collect()
    }

    /// All command lines received on all connections.
    pub fn all_commands(&self) -> Vec<String> {
        let g = self.state.lock().unwrap();
        g.conns.iter().flat_map(|c| c.commands.clone()).collect()
    }

    pub fn transcripts_debug(&self) -> String {
        let g = self.state.lock().unwrap();
        let mut s = String::new();
        for c in &g.conns {
            s.push_str(&format!(
                "--- conn {} (tls={}, closed={}) ---\n{}\n",
                c.id,
                c.tls,
                c.closed,
                show(&c.transcript)
            ));
        }
        s
    }

    /// Wait until at least `n` connections were closed by the proxy side (or panics).
    pub async fn wait_closed(&self, n: usize, timeout: Duration) {
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            let closed = self.conns().iter().filter(|c| c.closed).count();
            if closed >= n {
                return;
            }
            if tokio::time::Instant::now() > deadline {
                panic!("only {closed} next-hop connections closed, wanted {n}");
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
}

struct Conn {
    st: Shared,
    id: usize,
    io: Stream,
    buf: Vec<u8>,
}

#[derive(PartialEq, Eq)]
enum Flow {
    Continue,
    Close,
}

impl Conn {
    fn script(&self) -> Script {
        self.st.lock().unwrap().script.clone().unwrap()
    }

    fn record_in(&self, bytes: &[u8]) {
        self.st.lock().unwrap().conns[self.id]
            .transcript
            .extend_from_slice(bytes);
    }

    async fn fill(&mut self) -> bool {
        let mut tmp = [0u8; 16384];
        match self.io.read(&mut tmp).await {
            Ok(0) | Err(_) => false,
            Ok(n) => {
                self.record_in(&tmp[..n]);
                self.buf.extend_from_slice(&tmp[..n]);
                true
            }
        }
    }

    async fn read_line(&mut self) -> Option<String> {
        loop {
            if let Some(p) = self.buf.iter().position(|&b| b == b'\n') {
                let raw: Vec<u8> = self.buf.drain(..=p).collect();
                let mut l = &raw[..raw.len() - 1];
                if let Some(s) = l.strip_suffix(b"\r") {
                    l = s;
                }
                let line = show(l);
                self.st.lock().unwrap().conns[self.id]
                    .commands
                    .push(line.clone());
                return Some(line);
            }
            if self.buf.len() > 100_000 {
                return None;
            }
            if !self.fill().await {
                return None;
            }
        }
    }

    async fn send(&mut self, data: &[u8]) -> bool {
        self.io.write_all(data).await.is_ok()
    }

    /// Perform an act. Returns Close if the connection must end.
    fn perform<'a>(
        &'a mut self,
        act: &'a Act,
    ) -> std::pin::Pin<Box<dyn std::future::Future<Output = Flow> + Send + 'a>> {
        Box::pin(async move {
            match act {
                Act::Reply(s) => {
                    let mut out = Vec::new();
                    for l in s.split('\n') {
                        out.extend_from_slice(l.trim_end_matches('\r').as_bytes());
                        out.extend_from_slice(b"\r\n");
                    }
                    if self.send(&out).await {
                        Flow::Continue
                    } else {
                        Flow::Close
                    }
                }
                Act::Raw(b) => {
                    if self.send(b).await {
                        Flow::Continue
                    } else {
                        Flow::Close
                    }
                }
                Act::Disconnect => Flow::Close,
                Act::Hang => {
                    while self.fill().await {
                        self.buf.clear();
                    }
                    Flow::Close
                }
                Act::Delay(d, a) => {
                    tokio::time::sleep(*d).await;
                    self.perform(a).await
                }
            }
        })
    }

    async fn run(&mut self) {
        let greeting = self.script().greeting;
        if self.perform(&greeting).await == Flow::Close {
            return;
        }
        let mut mail: Option<String> = None;
        let mut rcpts: Vec<String> = Vec::new();
        let mut xclient: Option<Vec<(String, String)>> = None;
        // BDAT chunks of the current transaction received so far, and whether the last
        // EHLO on this connection offered CHUNKING (a script changed later does not
        // take back what the connection was told).
        let mut chunks: Vec<u8> = Vec::new();
        let mut chunking = false;
        loop {
            let Some(line) = self.read_line().await else {
                return;
            };
            let script = self.script();
            let verb = line
                .split_whitespace()
                .next()
                .unwrap_or("")
                .to_ascii_uppercase();
            let flow = match verb.as_str() {
                "EHLO" => {
                    mail = None;
                    rcpts.clear();
                    chunking = script.ehlo.is_none()
                        && script
                            .caps
                            .iter()
                            .any(|c| c.eq_ignore_ascii_case("CHUNKING"));
                    let act = script.ehlo.clone().unwrap_or_else(|| {
                        let caps: Vec<&String> = script
                            .caps
                            .iter()
                            .filter(|c| !(self.io.is_tls() && c.eq_ignore_ascii_case("STARTTLS")))
                            .collect();
                        let mut lines = vec!["fake.mta.test greets you".to_string()];
                        lines.extend(caps.iter().map(|c| c.to_string()));
                        let n = lines.len();
                        let s: Vec<String> = lines
                            .iter()
                            .enumerate()
                            .map(|(i, l)| format!("250{}{l}", if i + 1 == n { ' ' } else { '-' }))
                            .collect();
                        Act::Reply(s.join("\n"))
                    });
                    self.perform(&act).await
                }
                "HELO" => {
                    mail = None;
                    rcpts.clear();
                    self.perform(&script.helo).await
                }
                "XCLIENT" => {
                    let attrs: Vec<(String, String)> = line
                        .split_whitespace()
                        .skip(1)
                        .map(|kv| match kv.split_once('=') {
                            Some((k, v)) => (k.to_ascii_uppercase(), v.to_string()),
                            None => (kv.to_ascii_uppercase(), String::new()),
                        })
                        .collect();
                    self.st.lock().unwrap().conns[self.id]
                        .xclient
                        .push(attrs.clone());
                    xclient = Some(attrs);
                    mail = None;
                    rcpts.clear();
                    self.perform(&script.xclient).await
                }
                "STARTTLS" => {
                    let offered = script
                        .caps
                        .iter()
                        .any(|c| c.eq_ignore_ascii_case("STARTTLS"));
                    if self.io.is_tls() || !offered {
                        self.perform(&Act::reply("502 5.5.1 STARTTLS not available"))
                            .await
                    } else {
                        // The 220 and any injected bytes go out in ONE write, so the
                        // injection reaches the peer before its TLS ClientHello.
                        let act = match (&script.starttls, &script.starttls_inject) {
                            (Act::Reply(r), Some(inj)) => {
                                let mut b = r.clone().into_bytes();
                                b.extend_from_slice(b"\r\n");
                                b.extend_from_slice(inj);
                                Act::Raw(b)
                            }
                            (a, _) => a.clone(),
                        };
                        let f = self.perform(&act).await;
                        if f == Flow::Continue && script.starttls.code() == Some(220) {
                            // Anything pipelined after STARTTLS is discarded.
                            self.buf.clear();
                            let tcp = match std::mem::replace(&mut self.io, Stream::Gone) {
                                Stream::Plain(t) => t,
                                _ => unreachable!(),
                            };
                            let acceptor = tokio_rustls::TlsAcceptor::from(
                                script.tls_server.clone().unwrap_or_else(server_tls_config),
                            );
                            match tokio::time::timeout(
                                Duration::from_secs(60),
                                acceptor.accept(tcp),
                            )
                            .await
                            {
                                Ok(Ok(tls)) => {
                                    self.io = Stream::ServerTls(Box::new(tls));
                                    self.st.lock().unwrap().conns[self.id].tls = true;
                                    mail = None;
                                    rcpts.clear();
                                    Flow::Continue
                                }
                                _ => Flow::Close,
                            }
                        } else {
                            f
                        }
                    }
                }
                "MAIL" => {
                    let act = script.mail.clone();
                    if act.code().is_some_and(|c| c / 100 == 2) {
                        mail = Some(line.clone());
                        rcpts.clear();
                    }
                    self.perform(&act).await
                }
                "RCPT" => {
                    let arg = line.to_ascii_lowercase();
                    let act = script
                        .rcpt_by_addr
                        .iter()
                        .find(|(pat, _)| arg.contains(&pat.to_ascii_lowercase()))
                        .map(|(_, a)| a.clone())
                        .unwrap_or_else(|| script.rcpt.clone());
                    let act = match &script.relay_rules {
                        Some(rules) if !self.relay_permitted(rules, &line, xclient.as_deref()) => {
                            Act::reply("554 5.7.1 Relay access denied")
                        }
                        _ => act,
                    };
                    if mail.is_some() && act.code().is_some_and(|c| c / 100 == 2) {
                        rcpts.push(line.clone());
                    }
                    self.perform(&act).await
                }
                "DATA" => {
                    let act = script.data.clone();
                    let f = self.perform(&act).await;
                    if f == Flow::Continue && act.code() == Some(354) {
                        match self
                            .read_data(
                                script.lenient_data_end,
                                script.disconnect_mid_data,
                                &script.disconnect_mid_data_if,
                            )
                            .await
                        {
                            None => Flow::Close,
                            Some(raw) => {
                                let data = unstuff(&raw);
                                let message = self.message(&mail, &rcpts, &xclient, raw, data);
                                let f = self.finish_message(message).await;
                                mail = None;
                                rcpts.clear();
                                f
                            }
                        }
                    } else {
                        f
                    }
                }
                "BDAT" if chunking => {
                    // RFC 3030: `BDAT <size> [LAST]`, then exactly <size> bytes.
                    let mut args = line.split_whitespace().skip(1);
                    let size = args.next().and_then(|n| n.parse::<usize>().ok());
                    let last = args.next().is_some_and(|a| a.eq_ignore_ascii_case("LAST"));
                    let Some(size) = size else {
                        return; // a size we cannot read: the rest is not commands
                    };
                    let Some(chunk) = self
                        .read_exact_content(
                            size,
                            script.disconnect_mid_data,
                            &script.disconnect_mid_data_if,
                        )
                        .await
                    else {
                        return;
                    };
                    chunks.extend_from_slice(&chunk);
                    if mail.is_none() || rcpts.is_empty() {
                        chunks.clear();
                        self.perform(&Act::reply("503 5.5.1 Error: need RCPT command"))
                            .await
                    } else if !last {
                        self.perform(&Act::reply(&format!("250 2.0.0 {size} octets received")))
                            .await
                    } else {
                        let data = std::mem::take(&mut chunks);
                        let message = self.message(&mail, &rcpts, &xclient, data.clone(), data);
                        let f = self.finish_message(message).await;
                        // As after DATA: the transaction is over whatever the answer (a
                        // client that was refused sends RSET anyway, which is harmless).
                        mail = None;
                        rcpts.clear();
                        f
                    }
                }
                "RSET" => {
                    mail = None;
                    rcpts.clear();
                    chunks.clear();
                    self.perform(&script.rset).await
                }
                "AUTH" => self.auth(&line).await,
                "NOOP" => self.perform(&Act::reply("250 2.0.0 Ok")).await,
                "QUIT" => {
                    let _ = self.perform(&Act::reply("221 2.0.0 Bye")).await;
                    Flow::Close
                }
                _ => {
                    self.perform(&Act::reply("500 5.5.2 Error: command not recognized"))
                        .await
                }
            };
            if flow == Flow::Close {
                return;
            }
        }
    }

    /// A message of this connection's transaction, as it arrived (`raw`) and as read.
    fn message(
        &self,
        mail: &Option<String>,
        rcpts: &[String],
        xclient: &Option<Vec<(String, String)>>,
        raw: Vec<u8>,
        data: Vec<u8>,
    ) -> Message {
        Message {
            conn: self.id,
            mail: mail.clone().unwrap_or_default(),
            rcpts: rcpts.to_vec(),
            raw,
            data,
            accepted: false,
            xclient: xclient.clone(),
        }
    }

    /// A message whose content arrived in full (the end of data, or the last BDAT
    /// chunk): recorded, then answered as the script says for that content (re-read: a
    /// test may have changed it meanwhile).
    async fn finish_message(&mut self, message: Message) -> Flow {
        let sc = self.script();
        let eod = sc
            .eod_by_content
            .iter()
            .find(|(pat, _)| super::contains(&message.data, pat.as_bytes()))
            .map(|(_, a)| a.clone())
            .unwrap_or(sc.eod);
        let idx = {
            let mut g = self.st.lock().unwrap();
            g.messages.push(message);
            g.messages.len() - 1
        };
        self.perform_eod(&eod, idx).await
    }

    /// End-of-data reply: mark the message accepted just before a 2xx is written.
    async fn perform_eod(&mut self, act: &Act, idx: usize) -> Flow {
        let mut a = act.clone();
        while let Act::Delay(d, inner) = a {
            tokio::time::sleep(d).await;
            a = *inner;
        }
        if a.code().is_some_and(|c| c / 100 == 2) {
            self.st.lock().unwrap().messages[idx].accepted = true;
        }
        self.perform(&a).await
    }

    /// Reads exactly `size` bytes of a BDAT chunk (the disconnect options apply as in
    /// DATA); None if the connection ended or the script closes it.
    async fn read_exact_content(
        &mut self,
        size: usize,
        disconnect_mid: bool,
        disconnect_if: &[String],
    ) -> Option<Vec<u8>> {
        loop {
            let seen = &self.buf[..self.buf.len().min(size)];
            if cut_mid_content(seen, disconnect_mid, disconnect_if) {
                return None;
            }
            if self.buf.len() >= size {
                return Some(self.buf.drain(..size).collect());
            }
            if !self.fill().await {
                return None;
            }
        }
    }

    /// Read message content up to the end-of-data marker; returns the (dot-stuffed)
    /// content including the CRLF of the last line, or None if the connection ended.
    async fn read_data(
        &mut self,
        lenient: bool,
        disconnect_mid: bool,
        disconnect_if: &[String],
    ) -> Option<Vec<u8>> {
        // Bytes already searched for the end marker: each fill searches only what is new
        // (plus a marker's length back), so a 10 MB message is not rescanned per read.
        let mut searched: usize = 0;
        loop {
            // Checked first: even if the whole message arrived in one read, the fake
            // closes without ever completing it.
            if cut_mid_content(&self.buf, disconnect_mid, disconnect_if) {
                return None;
            }
            let from = searched.saturating_sub(5);
            if let Some((content_end, consumed)) = find_data_end_from(&self.buf, from, lenient) {
                let raw = self.buf[..content_end].to_vec();
                self.buf.drain(..consumed);
                return Some(raw);
            }
            searched = self.buf.len();
            if !self.fill().await {
                return None;
            }
        }
    }
}

/// Whether the script closes the connection now, with `seen` of the message content
/// received: as soon as any arrived (`disconnect_mid`), or once it holds one of
/// `disconnect_if`.
fn cut_mid_content(seen: &[u8], disconnect_mid: bool, disconnect_if: &[String]) -> bool {
    (disconnect_mid && !seen.is_empty())
        || disconnect_if
            .iter()
            .any(|p| super::contains(seen, p.as_bytes()))
}

/// Find the end of DATA. Returns (end of content, bytes consumed including the marker).
pub fn find_data_end(buf: &[u8], lenient: bool) -> Option<(usize, usize)> {
    find_data_end_from(buf, 0, lenient)
}

/// [`find_data_end`] for a marker that starts at `from` or later.
fn find_data_end_from(buf: &[u8], from: usize, lenient: bool) -> Option<(usize, usize)> {
    if from == 0 && buf.starts_with(b".\r\n") {
        return Some((0, 3));
    }
    if from == 0 && lenient && buf.starts_with(b".\n") {
        return Some((0, 2));
    }
    // (pattern, length of the line ending that belongs to the content)
    let strict: &[(&[u8], usize)] = &[(b"\r\n.\r\n", 2)];
    let loose: &[(&[u8], usize)] = &[
        (b"\r\n.\r\n", 2),
        (b"\r\n.\n", 2),
        (b"\n.\r\n", 1),
        (b"\n.\n", 1),
        (b"\r.\r\n", 1),
        (b"\r.\r", 1),
    ];
    let pats = if lenient { loose } else { strict };
    let mut best: Option<(usize, usize, usize)> = None; // (index, content_end, consumed)
    for (pat, keep) in pats {
        if let Some(i) = super::find(&buf[from.min(buf.len())..], pat).map(|i| i + from)
            && best.is_none_or(|(bi, _, _)| i < bi)
        {
            best = Some((i, i + keep, i + pat.len()));
        }
    }
    best.map(|(_, e, c)| (e, c))
}

/// Remove dot-stuffing: a '.' at the start of a line (after any LF) is dropped.
pub fn unstuff(raw: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(raw.len());
    let mut at_start = true;
    for &b in raw {
        if at_start && b == b'.' {
            at_start = false;
            continue;
        }
        out.push(b);
        at_start = b == b'\n';
    }
    out
}

// ---------------------------------------------------------------------------
// AUTH PLAIN / LOGIN (RFC 4954): the fake checks passwords like a real next hop
// ---------------------------------------------------------------------------

/// One AUTH exchange the fake completed.
#[derive(Clone, Debug)]
pub struct AuthAttempt {
    pub conn: usize,
    /// `PLAIN` or `LOGIN`.
    pub mechanism: String,
    pub username: String,
    /// Answered 235.
    pub success: bool,
}

impl Script {
    /// Offer `AUTH PLAIN LOGIN` in EHLO (accepted users: [`FakeMta::set_auth_users`]).
    pub fn with_auth(mut self) -> Self {
        self.caps.push("AUTH PLAIN LOGIN".into());
        self
    }
}

impl FakeMta {
    /// AUTH answers 235 for exactly these (user, password) pairs, 535 5.7.8 otherwise.
    pub fn set_auth_users(&self, users: &[(&str, &str)]) {
        self.state.lock().unwrap().auth_users = users
            .iter()
            .map(|(u, p)| (u.to_string(), p.to_string()))
            .collect();
    }

    pub fn auth_attempts(&self) -> Vec<AuthAttempt> {
        self.state.lock().unwrap().auth_attempts.clone()
    }

    /// Who logged in successfully on connection `conn` (the last one, if several).
    pub fn login_of(&self, conn: usize) -> Option<String> {
        let g = self.state.lock().unwrap();
        g.auth_attempts
            .iter()
            .rev()
            .find(|a| a.conn == conn && a.success)
            .map(|a| a.username.clone())
    }

    /// Messages answered 2xx, per login of their connection (`""`: not authenticated).
    pub fn accepted_per_login(&self) -> std::collections::BTreeMap<String, usize> {
        let mut out = std::collections::BTreeMap::new();
        for m in self.accepted() {
            let login = self.login_of(m.conn).unwrap_or_default();
            *out.entry(login).or_insert(0) += 1;
        }
        out
    }
}

impl Conn {
    /// Reads one SASL response line after sending `334 challenge`.
    async fn sasl_response(&mut self, challenge: &str) -> Option<String> {
        if !self.send(format!("334 {challenge}\r\n").as_bytes()).await {
            return None;
        }
        self.read_line().await
    }

    async fn auth(&mut self, line: &str) -> Flow {
        use base64::Engine;
        let b64 = base64::engine::general_purpose::STANDARD;
        let decode = |s: &str| {
            b64.decode(s.trim())
                .ok()
                .and_then(|b| String::from_utf8(b).ok())
        };
        let mut words = line.split_whitespace().skip(1);
        let mechanism = words.next().unwrap_or("").to_ascii_uppercase();
        let initial = words.next().map(str::to_string);
        let creds = match mechanism.as_str() {
            "PLAIN" => {
                let response = match initial {
                    Some(r) => r,
                    None => match self.sasl_response("").await {
                        Some(r) => r,
                        None => return Flow::Close,
                    },
                };
                decode(&response).and_then(|blob| {
                    let parts: Vec<&str> = blob.split('\0').collect();
                    match parts.as_slice() {
                        [_, user, pass] => Some((user.to_string(), pass.to_string())),
                        _ => None,
                    }
                })
            }
            "LOGIN" => {
                let user = match initial {
                    Some(u) => u,
                    None => match self.sasl_response(&b64.encode("Username:")).await {
                        Some(u) => u,
                        None => return Flow::Close,
                    },
                };
                let Some(pass) = self.sasl_response(&b64.encode("Password:")).await else {
                    return Flow::Close;
                };
                decode(&user).zip(decode(&pass))
            }
            _ => {
                return self
                    .perform(&Act::reply("504 5.5.4 Unrecognized authentication type"))
                    .await;
            }
        };
        let Some((username, password)) = creds else {
            return self
                .perform(&Act::reply("501 5.5.2 Cannot decode response"))
                .await;
        };
        let success = {
            let mut g = self.st.lock().unwrap();
            let ok = g
                .auth_users
                .iter()
                .any(|(u, p)| *u == username && *p == password);
            g.auth_attempts.push(AuthAttempt {
                conn: self.id,
                mechanism,
                username,
                success: ok,
            });
            ok
        };
        let reply = if success {
            "235 2.7.0 Authentication successful"
        } else {
            "535 5.7.8 Authentication credentials invalid"
        };
        self.perform(&Act::reply(reply)).await
    }
}

impl Conn {
    /// [`RelayRules`] applied to one `RCPT TO:` line.
    fn relay_permitted(
        &self,
        rules: &RelayRules,
        rcpt_line: &str,
        xclient: Option<&[(String, String)]>,
    ) -> bool {
        let addr = angle_addr(rcpt_line).to_ascii_lowercase();
        let local = addr.rsplit_once('@').is_some_and(|(_, d)| {
            rules
                .local_domains
                .iter()
                .any(|l| l.eq_ignore_ascii_case(d))
        });
        if local {
            return true;
        }
        let attr = |name: &str| {
            xclient.and_then(|a| {
                a.iter()
                    .rev()
                    .find(|(k, _)| k == name)
                    .map(|(_, v)| v.clone())
            })
        };
        let login = attr("LOGIN").is_some_and(|v| !v.is_empty() && v != "[UNAVAILABLE]");
        let authenticated = login || {
            let g = self.st.lock().unwrap();
            g.auth_attempts
                .iter()
                .any(|a| a.conn == self.id && a.success)
        };
        if authenticated {
            return true;
        }
        let client = match attr("ADDR") {
            Some(a) => a.parse::<std::net::IpAddr>().ok(),
            None => self.st.lock().unwrap().conns[self.id].peer.map(|p| p.ip()),
        };
        client.is_some_and(|ip| rules.in_mynetworks(ip))
    }
}
