//! A tiny SMTP test client: raw bytes in, parsed replies out. Every read is bounded
//! by [`super::STEP`], so a missing reply fails the test instead of hanging it.
#![allow(dead_code)]

use std::net::SocketAddr;
use std::time::Duration;

use rustls::pki_types::ServerName;
use tokio::net::TcpStream;

use super::{STEP, Stream, client_tls_config, show};

/// One SMTP reply (possibly multi-line).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Reply {
    pub code: u16,
    /// Text of each line, after the code and separator.
    pub lines: Vec<String>,
    /// The raw bytes of the reply, including CRLFs.
    pub raw: Vec<u8>,
}

impl Reply {
    /// Text of the first line (after "NNN " / "NNN-").
    pub fn text(&self) -> &str {
        self.lines.first().map(String::as_str).unwrap_or("")
    }

    /// All lines joined by '\n'.
    pub fn full_text(&self) -> String {
        self.lines.join("\n")
    }

    /// Enhanced status code (first token of the first line) if it looks like one.
    pub fn enhanced(&self) -> Option<&str> {
        let tok = self.text().split_whitespace().next()?;
        let parts: Vec<&str> = tok.split('.').collect();
        if parts.len() == 3
            && parts
                .iter()
                .all(|p| !p.is_empty() && p.bytes().all(|b| b.is_ascii_digit()))
        {
            Some(tok)
        } else {
            None
        }
    }

    /// Does the (EHLO) reply advertise `keyword` (case-insensitive, first word of a line)?
    pub fn has_ext(&self, keyword: &str) -> bool {
        self.ext_line(keyword).is_some()
    }

    /// The EHLO line whose first word is `keyword`.
    pub fn ext_line(&self, keyword: &str) -> Option<&str> {
        self.lines.iter().skip(1).map(String::as_str).find(|l| {
            l.split_whitespace()
                .next()
                .is_some_and(|w| w.eq_ignore_ascii_case(keyword))
        })
    }

    /// "NNN X.Y.Z" prefix check, e.g. `r.is("451 4.4.1")`.
    pub fn is(&self, code_and_enhanced: &str) -> bool {
        let mut it = code_and_enhanced.split_whitespace();
        let code: u16 = it.next().unwrap().parse().unwrap();
        match it.next() {
            Some(enh) => self.code == code && self.enhanced() == Some(enh),
            None => self.code == code,
        }
    }
}

/// Assert a reply has exactly this code and enhanced code, with a useful message.
#[track_caller]
pub fn assert_reply(r: &Reply, expected: &str, ctx: &str) {
    assert!(
        r.is(expected),
        "{ctx}: expected {expected:?}, got {:?}",
        show(&r.raw)
    );
}

pub struct Client {
    stream: Stream,
    buf: Vec<u8>,
    pub timeout: Duration,
    /// The last bytes sent (for failure messages).
    last_sent: Vec<u8>,
}

impl Client {
    pub async fn connect(addr: SocketAddr) -> Client {
        let s = tokio::time::timeout(STEP, TcpStream::connect(addr))
            .await
            .unwrap_or_else(|_| panic!("connect to {addr} timed out"))
            .unwrap_or_else(|e| panic!("connect to {addr}: {e}"));
        Client::from_tcp(s)
    }

    /// Connect; Err if the connection is refused.
    pub async fn try_connect(addr: SocketAddr) -> std::io::Result<Client> {
        let s = tokio::time::timeout(STEP, TcpStream::connect(addr))
            .await
            .map_err(|_| std::io::Error::new(std::io::ErrorKind::TimedOut, "connect timeout"))??;
        Ok(Client::from_tcp(s))
    }

    pub fn from_tcp(s: TcpStream) -> Client {
        Client {
            stream: Stream::Plain(s),
            buf: Vec::new(),
            timeout: STEP,
            last_sent: Vec::new(),
        }
    }

    /// Local address of the TCP connection (what the proxy sees as the client).
    pub fn local_addr(&self) -> SocketAddr {
        match &self.stream {
            Stream::Plain(s) => s.local_addr().unwrap(),
            Stream::ClientTls(s) => s.get_ref().0.local_addr().unwrap(),
            _ => panic!("no stream"),
        }
    }

    pub fn is_tls(&self) -> bool {
        self.stream.is_tls()
    }

    /// Bytes received but not yet consumed as replies.
    pub fn pending(&self) -> &[u8] {
        &self.buf
    }

    pub async fn send_raw(&mut self, data: &[u8]) {
        self.last_sent = data[..data.len().min(200)].to_vec();
        tokio::time::timeout(self.timeout, self.stream.write_all(data))
            .await
            .expect("write timed out")
            .expect("write failed");
    }

    /// Write that tolerates the peer having closed the connection.
    pub async fn try_send_raw(&mut self, data: &[u8]) -> std::io::Result<()> {
        match tokio::time::timeout(self.timeout, self.stream.write_all(data)).await {
            Ok(r) => r,
            Err(_) => Err(std::io::Error::new(
                std::io::ErrorKind::TimedOut,
                "write timeout",
            )),
        }
    }

    /// Read more bytes into the buffer; Ok(0) on EOF.
    async fn fill(&mut self) -> std::io::Result<usize> {
        let mut tmp = [0u8; 16384];
        let n = tokio::time::timeout(self.timeout, self.stream.read(&mut tmp))
            .await
            .map_err(|_| std::io::Error::new(std::io::ErrorKind::TimedOut, "read timeout"))??;
        self.buf.extend_from_slice(&tmp[..n]);
        Ok(n)
    }

    /// Try to parse one complete reply from the buffer.
    fn parse_reply(&mut self) -> Option<Reply> {
        let mut pos = 0;
        let mut lines = Vec::new();
        let mut code = None;
        loop {
            let rest = &self.buf[pos..];
            let nl = rest.iter().position(|&b| b == b'\n')?;
            let line = &rest[..nl];
            let line = line.strip_suffix(b"\r").unwrap_or(line);
            let text = String::from_utf8_lossy(line).into_owned();
            pos += nl + 1;
            if text.len() < 3 || !text.as_bytes()[..3].iter().all(u8::is_ascii_digit) {
                panic!(
                    "malformed reply line {text:?} (buffer {:?})",
                    show(&self.buf)
                );
            }
            let c: u16 = text[..3].parse().unwrap();
            if let Some(prev) = code
                && prev != c
            {
                panic!(
                    "multi-line reply changes code: {:?}",
                    show(&self.buf[..pos])
                );
            }
            code = Some(c);
            let sep = text.as_bytes().get(3).copied();
            lines.push(text.get(4..).unwrap_or("").to_string());
            match sep {
                Some(b'-') => continue,
                Some(b' ') | None => break,
                Some(other) => panic!("bad reply separator {:?} in {text:?}", other as char),
            }
        }
        let raw: Vec<u8> = self.buf.drain(..pos).collect();
        Some(Reply {
            code: code.unwrap(),
            lines,
            raw,
        })
    }

    /// Read one reply; None on EOF before a complete reply. Panics on timeout.
    pub async fn try_read_reply(&mut self) -> Option<Reply> {
        loop {
            if let Some(r) = self.parse_reply() {
                return Some(r);
            }
            match self.fill().await {
                Ok(0) => return None,
                Ok(_) => {}
                Err(e) if e.kind() == std::io::ErrorKind::TimedOut => {
                    panic!(
                        "no complete reply within {:?}; partial buffer {:?}; last sent {:?}",
                        self.timeout,
                        show(&self.buf),
                        show(&self.last_sent)
                    )
                }
                // Connection reset counts as EOF.
                Err(_) => return None,
            }
        }
    }

    /// Read one reply; panics on EOF or timeout.
    pub async fn read_reply(&mut self) -> Reply {
        match self.try_read_reply().await {
            Some(r) => r,
            None => panic!(
                "connection closed while waiting for a reply (partial {:?}); last sent {:?}",
                show(&self.buf),
                show(&self.last_sent)
            ),
        }
    }

    /// Send a command line (CRLF appended) and read its reply.
    pub async fn cmd(&mut self, line: &str) -> Reply {
        let mut data = line.as_bytes().to_vec();
        data.extend_from_slice(b"\r\n");
        self.send_raw(&data).await;
        self.read_reply().await
    }

    /// Like [`Client::cmd`], asserting the reply code / enhanced code.
    #[track_caller]
    pub fn expect<'a>(
        &'a mut self,
        line: &'a str,
        expected: &'a str,
    ) -> impl std::future::Future<Output = Reply> + 'a {
        let caller = std::panic::Location::caller();
        async move {
            let r = self.cmd(line).await;
            assert!(
                r.is(expected),
                "{line:?}: expected {expected:?}, got {:?} (at {caller})",
                show(&r.raw)
            );
            r
        }
    }

    /// Wait for the server to close the connection (any remaining data is returned).
    pub async fn expect_eof(&mut self) -> Vec<u8> {
        loop {
            match self.fill().await {
                Ok(0) => return std::mem::take(&mut self.buf),
                Ok(_) => {
                    if self.buf.len() > 1 << 20 {
                        panic!("server keeps sending instead of closing");
                    }
                }
                Err(e) if e.kind() == std::io::ErrorKind::TimedOut => {
                    panic!(
                        "server did not close the connection; buffered {:?}",
                        show(&self.buf)
                    )
                }
                Err(_) => return std::mem::take(&mut self.buf),
            }
        }
    }

    /// STARTTLS: send the command, expect `220`, then run the TLS handshake (SNI localhost).
    /// Bytes already buffered from the plaintext phase cause a panic (they would be
    /// plaintext injected into the TLS session).
    pub async fn starttls(&mut self) -> Reply {
        let r = self.cmd("STARTTLS").await;
        assert_eq!(r.code, 220, "STARTTLS: {r:?}");
        self.upgrade_tls().await;
        r
    }

    /// Run the TLS handshake on the current TCP connection.
    pub async fn upgrade_tls(&mut self) {
        assert!(
            self.buf.is_empty(),
            "plaintext bytes after the STARTTLS reply: {:?}",
            show(&self.buf)
        );
        let tcp = match std::mem::replace(&mut self.stream, Stream::Gone) {
            Stream::Plain(s) => s,
            _ => panic!("upgrade_tls on a non-plain stream"),
        };
        let connector = tokio_rustls::TlsConnector::from(client_tls_config());
        let name = ServerName::try_from("localhost").unwrap().to_owned();
        let tls = tokio::time::timeout(self.timeout, connector.connect(name, tcp))
            .await
            .expect("TLS handshake timed out")
            .expect("TLS handshake failed");
        self.stream = Stream::ClientTls(Box::new(tls));
    }

    /// EHLO, asserting 250.
    pub async fn ehlo(&mut self, name: &str) -> Reply {
        let r = self.cmd(&format!("EHLO {name}")).await;
        assert_eq!(r.code, 250, "EHLO: {r:?}");
        r
    }

    /// MAIL / RCPT... / DATA / body, asserting 250 / 2xx / 354; returns the final reply.
    /// `body` must not contain the terminating ".\r\n"; it is sent dot-stuffed and
    /// followed by CRLF.CRLF (a CRLF is added if the body does not end in one).
    pub async fn send_mail(&mut self, from: &str, rcpts: &[&str], body: &[u8]) -> Reply {
        let r = self.cmd(&format!("MAIL FROM:<{from}>")).await;
        assert_eq!(r.code, 250, "MAIL FROM:<{from}>: {r:?}");
        for rc in rcpts {
            let r = self.cmd(&format!("RCPT TO:<{rc}>")).await;
            assert_eq!(r.code / 100, 2, "RCPT TO:<{rc}>: {r:?}");
        }
        self.data(body).await
    }

    /// DATA + body + CRLF.CRLF (body is dot-stuffed here); expects 354, returns the final reply.
    pub async fn data(&mut self, body: &[u8]) -> Reply {
        let r = self.cmd("DATA").await;
        assert_eq!(r.code, 354, "DATA: {r:?}");
        self.send_raw(&dot_stuff_and_terminate(body)).await;
        self.read_reply().await
    }

    /// Read whatever arrives until the timeout, without failing (for "nothing else was
    /// sent" checks; keep the timeout short, it is not a speed assertion).
    pub async fn drain_for(&mut self, d: Duration) -> Vec<u8> {
        let saved = self.timeout;
        self.timeout = d;
        loop {
            match self.fill().await {
                Ok(0) | Err(_) => break,
                Ok(_) => {}
            }
        }
        self.timeout = saved;
        std::mem::take(&mut self.buf)
    }
}

/// Dot-stuff a canonical body and append the terminator.
pub fn dot_stuff_and_terminate(body: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(body.len() + 8);
    let mut at_line_start = true;
    for &b in body {
        if at_line_start && b == b'.' {
            out.push(b'.');
        }
        out.push(b);
        at_line_start = b == b'\n';
    }
    if !body.is_empty() && !body.ends_with(b"\r\n") {
        out.extend_from_slice(b"\r\n");
    }
    out.extend_from_slice(b".\r\n");
    out
}

/// A simple RFC 5322 message with a unique marker.
pub fn simple_message(from: &str, to: &str, subject: &str, body: &str) -> Vec<u8> {
    format!(
        "From: <{from}>\r\nTo: <{to}>\r\nSubject: {subject}\r\nMessage-ID: <{subject}@test.example>\r\n\r\n{body}\r\n"
    )
    .into_bytes()
}
