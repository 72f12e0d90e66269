//! Relay load benchmark: mailwarden in front of Postfix's `smtp-sink`.
//!
//! Run with `cargo bench --bench relay_load` (needs `[[bench]] name = "relay_load"
//! harness = false` in Cargo.toml; the bench profile builds mailwarden optimised,
//! like `cargo build --release`). Needs `smtp-sink` from Debian's postfix package
//! (`DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends postfix`).
//!
//! In one run it measures, for 4 KB messages at concurrency 1, 10 and 100:
//! - messages/s and p50/p99 per-message latency sent (a) directly to smtp-sink
//!   and (b) through mailwarden to the same smtp-sink, on two listeners of one
//!   mailwarden process:
//!   - `relay`: a submission listener (no sender verification; the client is in
//!     `[outbound] trusted_networks`, so each message is counted by the burst detector);
//!   - `inbound`: an inbound listener (SPF/DKIM/DMARC verification; every DNS
//!     query goes to a stub server in this process on 127.0.0.1 that answers
//!     NXDOMAIN with a cacheable SOA, so all checks give `none`);
//! - mailwarden's CPU time (utime+stime from /proc/PID/stat) per relayed
//!   message, and that of the client (this process, incl. the stub DNS) and the
//!   sink;
//!
//! and, on a fresh mailwarden process, its resident memory per idle session with
//! 2,000 idle sessions open on the inbound listener (VmRSS from
//! /proc/PID/status before/after).
//!
//! One message = one SMTP session, lockstep (no PIPELINING): connect, greeting,
//! EHLO, MAIL, RCPT, DATA, message, QUIT, then wait for the server to close.
//! Latency is measured from the start of connect() to the 250 reply to the end of
//! DATA. Throughput counts whole sessions (up to the server's close).
//! All traffic is on 127.0.0.1 (mailwarden never uses the system resolver here);
//! every loop is bounded by a message count and a wall-clock limit.
//!
//! Knobs (environment):
//! - `RELAY_LOAD_SECS` (default 3): length of each measured run (after a
//!   warm-up of a fifth of that); each run also stops after
//!   `RELAY_LOAD_MAX_MESSAGES` (default 200000) messages.
//! - `RELAY_LOAD_REPEAT` (default 3): runs per (concurrency, path), interleaved
//!   across the paths; the table shows each path's median-throughput run (all
//!   its numbers come from that run) and the range of all runs.
//! - `RELAY_LOAD_IDLE_SESSIONS` (default 2000).
//! - `MAILWARDEN_BIN`: proxy binary to measure instead of the one Cargo built.
//! - `RELAY_LOAD_OUT`: also write the markdown report to this file.
//! - `RELAY_LOAD_STARTTLS=1`: the listeners offer STARTTLS (the repository's RSA-2048
//!   test certificate, `certs/test-server.*`) and two more paths run beside the plain
//!   ones: `relay+tls` and `inbound+tls`, where every session is EHLO, STARTTLS, a full
//!   TLS handshake (rustls client, no resumption, certificate not verified, as MTAs
//!   commonly do), EHLO, then the transaction. Beside them the report gives the cost of
//!   a bare rustls handshake, server side, with the same certificate and client
//!   configuration, measured in this process (`handshake_cost`), and checks the target
//!   proxy CPU per TLS message <= 1.5 x (handshake + the same path's plain CPU per message).

#[path = "../tests/common/stub_dns.rs"]
mod stub_dns;

use std::fmt::Write as _;
use std::fs;
use std::net::{SocketAddr, TcpListener};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicI64, Ordering};
use std::time::{Duration, Instant};

use stub_dns::StubDns;
use tokio::io::{AsyncBufReadExt, AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, BufReader};
use tokio::net::TcpStream;

const APT_LINE: &str =
    "DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends postfix";
const MESSAGE_SIZE: usize = 4096;
const CONCURRENCY: [usize; 3] = [1, 10, 100];
const OP_TIMEOUT: Duration = Duration::from_secs(30);
const CLOSE_TIMEOUT: Duration = Duration::from_secs(5);

// Product targets.
const TARGET_RATIO_C100: f64 = 0.50;
const TARGET_CPU_MS_PER_MSG: f64 = 0.2;
const TARGET_ADDED_LATENCY_MS_C1: f64 = 1.0;
const TARGET_RSS_KB_PER_IDLE_SESSION: f64 = 64.0;
/// With STARTTLS: proxy CPU per message <= this x (bare handshake + plain CPU per message).
const TARGET_TLS_FACTOR: f64 = 1.5;

// ---------------------------------------------------------------------------
// process helpers

fn find_program(name: &str) -> Option<PathBuf> {
    let mut dirs: Vec<PathBuf> = vec!["/usr/sbin".into(), "/usr/bin".into()];
    if let Some(path) = std::env::var_os("PATH") {
        dirs.extend(std::env::split_paths(&path));
    }
    dirs.into_iter().map(|d| d.join(name)).find(|p| p.is_file())
}

fn mailwarden_bin() -> PathBuf {
    if let Some(p) = std::env::var_os("MAILWARDEN_BIN") {
        return p.into();
    }
    match option_env!("CARGO_BIN_EXE_mailwarden") {
        Some(p) => p.into(),
        None => PathBuf::from("target/release/mailwarden"),
    }
}

fn env_f64(name: &str, default: f64) -> f64 {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

fn effective_uid() -> u32 {
    fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find_map(|l| l.strip_prefix("Uid:"))
                .and_then(|r| r.split_whitespace().nth(1))
                .and_then(|v| v.parse().ok())
        })
        .unwrap_or(u32::MAX)
}

fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("bind an ephemeral port")
        .port()
}

/// Raises this process's RLIMIT_NOFILE soft limit (children inherit it) with
/// util-linux `prlimit`, as the crate forbids unsafe code (no setrlimit call).
fn raise_nofile(wanted: u64) -> u64 {
    let read = || -> (u64, u64) {
        let limits = fs::read_to_string("/proc/self/limits").unwrap_or_default();
        let line = limits
            .lines()
            .find(|l| l.starts_with("Max open files"))
            .unwrap_or("");
        let nums: Vec<u64> = line
            .split_whitespace()
            .filter_map(|w| {
                if w == "unlimited" {
                    Some(u64::MAX)
                } else {
                    w.parse().ok()
                }
            })
            .collect();
        (
            nums.first().copied().unwrap_or(1024),
            nums.get(1).copied().unwrap_or(1024),
        )
    };
    let (soft, hard) = read();
    if soft >= wanted {
        return soft;
    }
    let new_soft = wanted.min(hard);
    let status = Command::new("prlimit")
        .arg("--pid")
        .arg(std::process::id().to_string())
        .arg(format!("--nofile={new_soft}:{hard}"))
        .status();
    if !matches!(status, Ok(s) if s.success()) {
        eprintln!("warning: could not raise RLIMIT_NOFILE with prlimit ({status:?})");
    }
    read().0
}

fn clk_tck() -> f64 {
    Command::new("getconf")
        .arg("CLK_TCK")
        .output()
        .ok()
        .and_then(|o| String::from_utf8_lossy(&o.stdout).trim().parse().ok())
        .unwrap_or(100.0)
}

/// utime + stime of a process in seconds.
fn cpu_seconds(pid: u32, tck: f64) -> f64 {
    let stat = fs::read_to_string(format!("/proc/{pid}/stat")).expect("read /proc/PID/stat");
    let rest = stat.rsplit_once(')').expect("stat format").1;
    let f: Vec<&str> = rest.split_whitespace().collect();
    // rest starts at field 3 (state): utime is field 14, stime field 15.
    let utime: f64 = f[11].parse().unwrap();
    let stime: f64 = f[12].parse().unwrap();
    (utime + stime) / tck
}

/// A `VmXXX:` value of /proc/PID/status in KiB.
fn status_kib(pid: u32, key: &str) -> u64 {
    let status = fs::read_to_string(format!("/proc/{pid}/status")).expect("read /proc/PID/status");
    status
        .lines()
        .find_map(|l| l.strip_prefix(key))
        .and_then(|v| v.split_whitespace().next())
        .and_then(|v| v.parse().ok())
        .unwrap_or_else(|| panic!("no {key} in /proc/{pid}/status"))
}

struct Proc {
    name: &'static str,
    child: Child,
    log: PathBuf,
}

impl Proc {
    fn pid(&self) -> u32 {
        self.child.id()
    }

    fn log_tail(&self) -> String {
        let text = fs::read_to_string(&self.log).unwrap_or_default();
        let lines: Vec<&str> = text.lines().collect();
        lines[lines.len().saturating_sub(30)..].join("\n")
    }

    /// Polls until a TCP connection to `port` succeeds and the server greets.
    fn wait_ready(&mut self, port: u16) {
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            if let Ok(Some(status)) = self.child.try_wait() {
                panic!("{} exited with {status}:\n{}", self.name, self.log_tail());
            }
            if let Ok(s) = std::net::TcpStream::connect(("127.0.0.1", port)) {
                use std::io::{BufRead, Write};
                s.set_read_timeout(Some(Duration::from_secs(5))).ok();
                let mut line = String::new();
                let _ = std::io::BufReader::new(&s).read_line(&mut line);
                let _ = (&s).write_all(b"QUIT\r\n");
                if line.starts_with("220") {
                    return;
                }
            }
            assert!(
                Instant::now() < deadline,
                "{} did not greet on 127.0.0.1:{port} within 30s:\n{}",
                self.name,
                self.log_tail()
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// SIGTERM, then SIGKILL after `grace`.
    fn stop(&mut self, grace: Duration) {
        if let Ok(Some(_)) = self.child.try_wait() {
            return;
        }
        let _ = Command::new("kill")
            .arg("-TERM")
            .arg(self.pid().to_string())
            .status();
        let deadline = Instant::now() + grace;
        while Instant::now() < deadline {
            if let Ok(Some(_)) = self.child.try_wait() {
                return;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        eprintln!(
            "{} did not exit {grace:?} after SIGTERM; killing it",
            self.name
        );
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn start_sink(dir: &Path, port: u16) -> Proc {
    let sink = find_program("smtp-sink").unwrap_or_else(|| {
        panic!("smtp-sink not found: it comes with Debian's postfix package; install it with `{APT_LINE}`")
    });
    let log = dir.join("smtp-sink.log");
    let mut cmd = Command::new(sink);
    if effective_uid() == 0 {
        cmd.args(["-u", "nobody"]); // required when started as root
    }
    // -m: max simultaneous connections (default 256); backlog 4096.
    cmd.args(["-4", "-m", "4096", "-t", "60"])
        .arg(format!("127.0.0.1:{port}"))
        .arg("4096");
    let child = cmd
        .stdin(Stdio::null())
        .stdout(fs::File::create(&log).unwrap())
        .stderr(fs::File::create(dir.join("smtp-sink.stderr")).unwrap())
        .spawn()
        .expect("spawn smtp-sink");
    let mut p = Proc {
        name: "smtp-sink",
        child,
        log: dir.join("smtp-sink.stderr"),
    };
    p.wait_ready(port);
    p
}

/// One mailwarden process with an inbound listener on `ports.0` and a
/// submission listener on `ports.1`, relaying to the sink; its only DNS server
/// is the stub on `dns_port`.
fn start_proxy(
    dir: &Path,
    name: &str,
    ports: (u16, u16),
    sink_port: u16,
    dns_port: u16,
    max_sessions: usize,
    starttls: bool,
) -> Proc {
    let (inbound, submission) = ports;
    let tls = if starttls {
        let (cert, key) = tls_files();
        format!(
            "tls_cert = \"{}\"\ntls_key = \"{}\"\n",
            cert.display(),
            key.display()
        )
    } else {
        String::new()
    };
    let config = dir.join(format!("{name}.toml"));
    fs::write(
        &config,
        format!(
            "hostname = \"mailwarden.bench\"\n\
             local_domains = [\"bench.test\"]\n\
             \n\
             [[listener]]\n\
             address = \"127.0.0.1:{inbound}\"\n\
             role = \"inbound\"\n\
             max_sessions = {max_sessions}\n\
             max_sessions_per_client = {max_sessions}\n\
             {tls}\
             \n\
             [[listener]]\n\
             address = \"127.0.0.1:{submission}\"\n\
             role = \"submission\"\n\
             max_sessions = {max_sessions}\n\
             max_sessions_per_client = {max_sessions}\n\
             {tls}\
             \n\
             [next_hop]\n\
             address = \"smtp://127.0.0.1:{sink_port}\"\n\
             xclient = \"off\"\n\
             tls = \"off\"\n\
             \n\
             [dns]\n\
             nameservers = [\"127.0.0.1:{dns_port}\"]\n\
             timeout_ms = 2000\n\
             attempts = 1\n\
             \n\
             [shutdown]\n\
             grace_period = \"5s\"\n\
             \n\
             [log]\n\
             level = \"info\"\n\
             \n\
             # Submission needs AUTH except from trusted networks (issue 19), whose\n\
             # mail the outbound detector counts: the bench client is one of them, and\n\
             # only alerts so the load is never deferred.\n\
             [outbound]\n\
             trusted_networks = [\"127.0.0.0/8\"]\n\
             action = \"alert\"\n\
             [outbound.from]\n\
             allow = \"any\"\n"
        ),
    )
    .unwrap();
    let log = dir.join(format!("{name}.stderr"));
    let bin = mailwarden_bin();
    let child = Command::new(&bin)
        .arg("run")
        .arg("--config")
        .arg(&config)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(fs::File::create(&log).unwrap())
        .spawn()
        .unwrap_or_else(|e| panic!("spawn {}: {e}", bin.display()));
    let mut p = Proc {
        name: "mailwarden",
        child,
        log,
    };
    p.wait_ready(inbound);
    p.wait_ready(submission);
    p
}

// ---------------------------------------------------------------------------
// STARTTLS

/// The repository's RSA-2048 test certificate and key (SAN localhost, 127.0.0.1).
fn tls_files() -> (PathBuf, PathBuf) {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("certs");
    (dir.join("test-server.crt"), dir.join("test-server.key"))
}

/// The bench client's TLS configuration: rustls defaults (aws-lc-rs), no resumption (a
/// full handshake per session, as inbound MX traffic from many senders mostly is).
fn client_tls() -> Arc<rustls::ClientConfig> {
    let provider = Arc::new(rustls::crypto::aws_lc_rs::default_provider());
    let mut cfg = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .unwrap()
        .dangerous()
        // Any certificate, as MTAs commonly accept for opportunistic STARTTLS; the
        // handshake signatures are still checked, so the client does the usual work.
        .with_custom_certificate_verifier(mailwarden::tls::NoVerify::new())
        .with_no_client_auth();
    cfg.resumption = rustls::client::Resumption::disabled();
    Arc::new(cfg)
}

/// Server-side CPU of one bare rustls handshake (ms, median of `n`): the proxy's own
/// server configuration (`mailwarden::tls::acceptor`, same certificate) against the bench
/// client's configuration, in memory, timing only the server's calls (one thread, so
/// wall time is CPU time). What STARTTLS cannot cost less than.
fn handshake_cost(n: usize) -> f64 {
    let (cert, key) = tls_files();
    let server_cfg = mailwarden::tls::acceptor(&cert, &key)
        .expect("test certificate")
        .config()
        .clone();
    let client_cfg = client_tls();
    let mut samples = Vec::with_capacity(n);
    for _ in 0..n {
        let name = rustls::pki_types::ServerName::try_from("localhost").unwrap();
        let mut client = rustls::ClientConnection::new(client_cfg.clone(), name).unwrap();
        let mut server = rustls::ServerConnection::new(server_cfg.clone()).unwrap();
        let mut server_time = Duration::ZERO;
        while client.is_handshaking() || server.is_handshaking() {
            let mut buf = Vec::new();
            while client.wants_write() {
                client.write_tls(&mut buf).unwrap();
            }
            let t = Instant::now();
            let mut rd = &buf[..];
            while !rd.is_empty() {
                server.read_tls(&mut rd).unwrap();
                server.process_new_packets().expect("server handshake");
            }
            let mut out = Vec::new();
            while server.wants_write() {
                server.write_tls(&mut out).unwrap();
            }
            server_time += t.elapsed();
            let mut rd = &out[..];
            while !rd.is_empty() {
                client.read_tls(&mut rd).unwrap();
                client.process_new_packets().expect("client handshake");
            }
            if buf.is_empty() && out.is_empty() {
                break;
            }
        }
        assert!(!client.is_handshaking() && !server.is_handshaking());
        samples.push(server_time.as_secs_f64() * 1000.0);
    }
    samples.sort_by(f64::total_cmp);
    samples[samples.len() / 2]
}

// ---------------------------------------------------------------------------
// SMTP load client

trait Io: AsyncRead + AsyncWrite + Unpin + Send {}
impl<T: AsyncRead + AsyncWrite + Unpin + Send> Io for T {}

struct Conn {
    /// Reads are buffered; writes go straight through (`BufReader` passes them on).
    r: BufReader<Box<dyn Io>>,
    line: String,
}

impl Conn {
    async fn connect(addr: SocketAddr) -> Result<Conn, String> {
        let s = tokio::time::timeout(OP_TIMEOUT, TcpStream::connect(addr))
            .await
            .map_err(|_| "connect timeout".to_string())?
            .map_err(|e| format!("connect: {e}"))?;
        s.set_nodelay(true).map_err(|e| e.to_string())?;
        Ok(Conn {
            r: BufReader::with_capacity(4096, Box::new(s)),
            line: String::new(),
        })
    }

    /// STARTTLS and the handshake; the session goes on encrypted.
    async fn starttls(self, tls: &tokio_rustls::TlsConnector) -> Result<Conn, String> {
        let mut c = self;
        c.cmd(b"STARTTLS\r\n", 220).await?;
        if !c.r.buffer().is_empty() {
            return Err("bytes after the 220 to STARTTLS".into());
        }
        let name = rustls::pki_types::ServerName::try_from("localhost").unwrap();
        let io = tokio::time::timeout(OP_TIMEOUT, tls.connect(name, c.r.into_inner()))
            .await
            .map_err(|_| "TLS handshake timeout".to_string())?
            .map_err(|e| format!("TLS handshake: {e}"))?;
        Ok(Conn {
            r: BufReader::with_capacity(4096, Box::new(io)),
            line: String::new(),
        })
    }

    /// Reads one (possibly multi-line) reply and returns its code.
    async fn reply(&mut self) -> Result<u16, String> {
        loop {
            self.line.clear();
            let n = tokio::time::timeout(OP_TIMEOUT, self.r.read_line(&mut self.line))
                .await
                .map_err(|_| "reply timeout".to_string())?
                .map_err(|e| format!("read: {e}"))?;
            if n == 0 {
                return Err("connection closed by server".into());
            }
            let b = self.line.as_bytes();
            if b.len() < 4 || !b[..3].iter().all(u8::is_ascii_digit) {
                return Err(format!("malformed reply {:?}", self.line));
            }
            if b[3] != b'-' {
                return Ok(self.line[..3].parse().unwrap());
            }
        }
    }

    async fn send(&mut self, bytes: &[u8]) -> Result<(), String> {
        tokio::time::timeout(OP_TIMEOUT, self.r.get_mut().write_all(bytes))
            .await
            .map_err(|_| "write timeout".to_string())?
            .map_err(|e| format!("write: {e}"))
    }

    async fn cmd(&mut self, line: &[u8], want: u16) -> Result<(), String> {
        self.send(line).await?;
        let code = self.reply().await?;
        if code != want {
            return Err(format!(
                "{} -> {}",
                String::from_utf8_lossy(line).trim_end(),
                self.line.trim_end()
            ));
        }
        Ok(())
    }

    /// Waits (bounded) for the server to close the connection, so the
    /// TIME_WAIT state stays on the server side and client ports are reused.
    async fn wait_close(&mut self) -> Result<(), String> {
        let mut buf = [0u8; 512];
        let deadline = tokio::time::Instant::now() + CLOSE_TIMEOUT;
        loop {
            match tokio::time::timeout_at(deadline, self.r.read(&mut buf)).await {
                Err(_) => return Err("server did not close after QUIT".into()),
                Ok(Ok(0)) | Ok(Err(_)) => return Ok(()),
                Ok(Ok(_)) => continue,
            }
        }
    }
}

/// One full session carrying one message; returns connect-to-250 latency. With `tls`,
/// the session is upgraded with STARTTLS first (and EHLO said again).
async fn send_one(
    addr: SocketAddr,
    wire: &[u8],
    tls: Option<&tokio_rustls::TlsConnector>,
) -> Result<Duration, String> {
    let start = Instant::now();
    let mut c = Conn::connect(addr).await?;
    let code = c.reply().await?;
    if code != 220 {
        return Err(format!("greeting {}", c.line.trim_end()));
    }
    c.cmd(b"EHLO load.client.test\r\n", 250).await?;
    if let Some(tls) = tls {
        c = c.starttls(tls).await?;
        c.cmd(b"EHLO load.client.test\r\n", 250).await?;
    }
    c.cmd(b"MAIL FROM:<load@client.test> SIZE=4096\r\n", 250)
        .await?;
    c.cmd(b"RCPT TO:<sink@bench.test>\r\n", 250).await?;
    c.cmd(b"DATA\r\n", 354).await?;
    c.cmd(wire, 250).await?;
    let latency = start.elapsed();
    c.cmd(b"QUIT\r\n", 221).await?;
    c.wait_close().await?;
    Ok(latency)
}

/// The 4096-octet message (headers + body, CRLF lines), dot-stuffed, with the
/// terminating CRLF.CRLF.
fn build_wire() -> Vec<u8> {
    let mut m = String::new();
    m.push_str("Date: Thu, 01 Jan 2026 00:00:00 +0000\r\n");
    m.push_str("From: Load Generator <load@client.test>\r\n");
    m.push_str("To: Sink <sink@bench.test>\r\n");
    m.push_str("Subject: relay_load benchmark message\r\n");
    m.push_str("Message-ID: <relay-load@client.test>\r\n");
    m.push_str("MIME-Version: 1.0\r\n");
    m.push_str("Content-Type: text/plain; charset=us-ascii\r\n");
    m.push_str("\r\n");
    let mut i = 0usize;
    while m.len() < MESSAGE_SIZE {
        let remaining = MESSAGE_SIZE - m.len();
        let full =
            format!("{i:04} The quick brown fox jumps over the lazy dog; 0123456789 abcdefghijklm");
        // keep >= 4 octets for a final padding line so the total is exact
        let line = if remaining >= full.len() + 2 + 4 {
            full
        } else {
            "z".repeat(remaining - 2)
        };
        m.push_str(&line);
        m.push_str("\r\n");
        i += 1;
    }
    assert_eq!(m.len(), MESSAGE_SIZE);
    let mut wire = Vec::with_capacity(m.len() + 8);
    for line in m.as_bytes().split_inclusive(|b| *b == b'\n') {
        if line.first() == Some(&b'.') {
            wire.push(b'.');
        }
        wire.extend_from_slice(line);
    }
    wire.extend_from_slice(b".\r\n");
    wire
}

struct RunResult {
    ok: u64,
    errors: u64,
    first_error: Option<String>,
    elapsed: Duration,
    latencies: Vec<Duration>,
}

impl RunResult {
    fn rate(&self) -> f64 {
        self.ok as f64 / self.elapsed.as_secs_f64()
    }

    fn pct_ms(&self, p: f64) -> f64 {
        if self.latencies.is_empty() {
            return f64::NAN;
        }
        let rank = ((p / 100.0) * self.latencies.len() as f64).ceil() as usize;
        let idx = rank.clamp(1, self.latencies.len()) - 1;
        self.latencies[idx].as_secs_f64() * 1000.0
    }
}

/// `concurrency` workers share a budget of `messages`; no new message is started
/// after `max_time`.
async fn run_load(
    addr: SocketAddr,
    concurrency: usize,
    messages: u64,
    max_time: Duration,
    wire: Arc<Vec<u8>>,
    tls: Option<tokio_rustls::TlsConnector>,
) -> RunResult {
    let budget = Arc::new(AtomicI64::new(messages as i64));
    let start = Instant::now();
    let deadline = start + max_time;
    let mut tasks = Vec::with_capacity(concurrency);
    for _ in 0..concurrency {
        let budget = budget.clone();
        let wire = wire.clone();
        let tls = tls.clone();
        tasks.push(tokio::spawn(async move {
            let mut lat = Vec::new();
            let mut errors = 0u64;
            let mut first_error = None;
            while Instant::now() < deadline && budget.fetch_sub(1, Ordering::Relaxed) > 0 {
                match send_one(addr, &wire, tls.as_ref()).await {
                    Ok(d) => lat.push(d),
                    Err(e) => {
                        errors += 1;
                        first_error.get_or_insert(e);
                        // do not spin on a persistent failure
                        tokio::time::sleep(Duration::from_millis(10)).await;
                    }
                }
            }
            (lat, errors, first_error)
        }));
    }
    let mut result = RunResult {
        ok: 0,
        errors: 0,
        first_error: None,
        elapsed: Duration::ZERO,
        latencies: Vec::with_capacity(messages as usize),
    };
    for t in tasks {
        let (lat, errors, first_error) = t.await.expect("load task panicked");
        result.ok += lat.len() as u64;
        result.latencies.extend(lat);
        result.errors += errors;
        if result.first_error.is_none() {
            result.first_error = first_error;
        }
    }
    result.elapsed = start.elapsed();
    result.latencies.sort_unstable();
    result
}

// ---------------------------------------------------------------------------
// idle sessions

struct IdleResult {
    sessions: usize,
    opened: usize,
    alive: usize,
    rss_before_kib: u64,
    rss_after_kib: u64,
    first_error: Option<String>,
}

async fn idle_sessions(addr: SocketAddr, pid: u32, count: usize) -> IdleResult {
    // Warm up the proxy's runtime (threads, allocator) with a few sessions.
    for _ in 0..20 {
        if let Ok(mut c) = Conn::connect(addr).await {
            let _ = c.reply().await;
            let _ = c.cmd(b"EHLO warmup.test\r\n", 250).await;
            let _ = c.cmd(b"QUIT\r\n", 221).await;
            let _ = c.wait_close().await;
        }
    }
    tokio::time::sleep(Duration::from_millis(500)).await;
    let rss_before_kib = status_kib(pid, "VmRSS:");

    let mut conns = Vec::with_capacity(count);
    let mut first_error = None;
    // Open in batches of 100 concurrent handshakes.
    let mut remaining = count;
    while remaining > 0 {
        let batch = remaining.min(100);
        remaining -= batch;
        let mut set = Vec::with_capacity(batch);
        for _ in 0..batch {
            set.push(tokio::spawn(async move {
                let mut c = Conn::connect(addr).await?;
                let code = c.reply().await?;
                if code != 220 {
                    return Err(format!("greeting {}", c.line.trim_end()));
                }
                c.cmd(b"EHLO idle.client.test\r\n", 250).await?;
                Ok(c)
            }));
        }
        for t in set {
            match t.await.expect("idle task panicked") {
                Ok(c) => conns.push(c),
                Err(e) => {
                    first_error.get_or_insert(e);
                }
            }
        }
    }
    let opened = conns.len();
    tokio::time::sleep(Duration::from_secs(1)).await;
    let rss_after_kib = status_kib(pid, "VmRSS:");

    // All of them must still be usable sessions.
    let mut alive = 0;
    let mut checks = Vec::with_capacity(opened);
    for mut c in conns {
        checks.push(tokio::spawn(async move {
            let r = c.cmd(b"NOOP\r\n", 250).await;
            (r, c)
        }));
    }
    let mut conns = Vec::with_capacity(opened);
    for t in checks {
        let (r, c) = t.await.expect("noop task panicked");
        match r {
            Ok(()) => alive += 1,
            Err(e) => {
                first_error.get_or_insert(e);
            }
        }
        conns.push(c);
    }
    drop(conns);
    IdleResult {
        sessions: count,
        opened,
        alive,
        rss_before_kib,
        rss_after_kib,
        first_error,
    }
}

// ---------------------------------------------------------------------------

fn main() {
    let run_time = Duration::from_secs_f64(env_f64("RELAY_LOAD_SECS", 3.0).clamp(0.2, 600.0));
    let warm_time = run_time / 5;
    let repeats = env_f64("RELAY_LOAD_REPEAT", 3.0).clamp(1.0, 20.0) as usize;
    let max_messages = env_f64("RELAY_LOAD_MAX_MESSAGES", 200_000.0).max(1.0) as u64;
    let idle_count = env_f64("RELAY_LOAD_IDLE_SESSIONS", 2000.0) as usize;

    let nofile = raise_nofile(idle_count as u64 * 2 + 1024);
    if nofile < idle_count as u64 + 256 {
        panic!(
            "RLIMIT_NOFILE is {nofile}, too low for {idle_count} idle sessions; raise the hard limit"
        );
    }
    let tck = clk_tck();
    let bin = mailwarden_bin();
    assert!(
        bin.is_file(),
        "mailwarden binary {} not found (build with `cargo build --release` or run via `cargo bench`)",
        bin.display()
    );

    let dir = tempfile::Builder::new()
        .prefix("mw-relay-load-")
        .tempdir()
        .expect("tempdir");
    let dns = StubDns::start();
    let sink_port = free_port();
    let mut sink = start_sink(dir.path(), sink_port);
    let ports = (free_port(), free_port());
    let starttls = std::env::var("RELAY_LOAD_STARTTLS").is_ok_and(|v| v == "1");
    let mut proxy = start_proxy(
        dir.path(),
        "proxy",
        ports,
        sink_port,
        dns.port,
        4096,
        starttls,
    );
    let handshake_ms = starttls.then(|| handshake_cost(200));
    let tls_connector = starttls.then(|| tokio_rustls::TlsConnector::from(client_tls()));

    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    let wire = Arc::new(build_wire());
    // (name, address, STARTTLS)
    let mut paths: Vec<(&str, SocketAddr, bool)> = vec![
        ("direct", ([127, 0, 0, 1], sink_port).into(), false),
        ("relay", ([127, 0, 0, 1], ports.1).into(), false),
        ("inbound", ([127, 0, 0, 1], ports.0).into(), false),
    ];
    if starttls {
        paths.push(("relay+tls", ([127, 0, 0, 1], ports.1).into(), true));
        paths.push(("inbound+tls", ([127, 0, 0, 1], ports.0).into(), true));
    }

    eprintln!(
        "relay_load: proxy {} (pid {}), smtp-sink pid {}, {}-octet messages, {run_time:?} per run",
        bin.display(),
        proxy.pid(),
        sink.pid(),
        MESSAGE_SIZE
    );

    struct Row {
        c: usize,
        path: &'static str,
        run: RunResult,
        /// CPU ms per message of [client (incl. stub DNS), sink, proxy]
        cpu: [f64; 3],
        dns_per_msg: f64,
    }
    let pids = [std::process::id(), sink.pid(), proxy.pid()];
    let cpu_now = || pids.map(|pid| cpu_seconds(pid, tck));
    let mut rows: Vec<Row> = Vec::new();
    let mut rates: Vec<(usize, &str, Vec<f64>)> = Vec::new();
    for &c in &CONCURRENCY {
        // Repeat the three paths interleaved, so a burst of other load on the
        // machine hits all of them alike; keep each path's median run.
        let mut runs: Vec<Vec<Row>> = paths.iter().map(|_| Vec::new()).collect();
        for rep in 0..repeats {
            for (k, &(path, addr, tls)) in paths.iter().enumerate() {
                let tls = tls.then(|| tls_connector.clone()).flatten();
                rt.block_on(run_load(
                    addr,
                    c,
                    max_messages,
                    warm_time,
                    wire.clone(),
                    tls.clone(),
                ));
                let cpu0 = cpu_now();
                let q0 = dns.queries();
                let run = rt.block_on(run_load(addr, c, max_messages, run_time, wire.clone(), tls));
                let cpu1 = cpu_now();
                let n = if run.ok == 0 { f64::NAN } else { run.ok as f64 };
                let cpu = [0, 1, 2].map(|i| (cpu1[i] - cpu0[i]) * 1000.0 / n);
                let dns_per_msg = (dns.queries() - q0) as f64 / n;
                eprintln!(
                    "  c={c:<3} #{rep} {path:<7}: {} ok, {} errors in {:.2?} ({:.0}/s); CPU ms/msg client {:.3} sink {:.3} proxy {:.3}; DNS q/msg {dns_per_msg:.3}",
                    run.ok,
                    run.errors,
                    run.elapsed,
                    run.rate(),
                    cpu[0],
                    cpu[1],
                    cpu[2]
                );
                if let Some(e) = &run.first_error {
                    eprintln!("    first error: {e}");
                }
                runs[k].push(Row {
                    c,
                    path,
                    run,
                    cpu,
                    dns_per_msg,
                });
            }
        }
        for mut path_runs in runs {
            path_runs.sort_by(|a, b| a.run.rate().total_cmp(&b.run.rate()));
            let all: Vec<f64> = path_runs.iter().map(|r| r.run.rate()).collect();
            let median = path_runs.swap_remove(path_runs.len() / 2);
            rates.push((c, median.path, all));
            rows.push(median);
        }
    }
    let proxy_hwm = status_kib(proxy.pid(), "VmHWM:");
    proxy.stop(Duration::from_secs(10));
    let proxy_log = fs::read_to_string(&proxy.log).unwrap_or_default();
    let proxy_warnings: Vec<&str> = proxy_log
        .lines()
        .filter(|l| l.contains("WARN") || l.contains("ERROR"))
        .take(5)
        .collect();

    // Idle sessions on a fresh process, so freed memory from the load runs
    // does not hide the per-session cost.
    let idle_ports = (free_port(), free_port());
    let mut idle_proxy = start_proxy(
        dir.path(),
        "proxy-idle",
        idle_ports,
        sink_port,
        dns.port,
        idle_count + 1000,
        false,
    );
    let idle_addr: SocketAddr = ([127, 0, 0, 1], idle_ports.0).into();
    let idle = rt.block_on(idle_sessions(idle_addr, idle_proxy.pid(), idle_count));
    idle_proxy.stop(Duration::from_secs(10));
    sink.stop(Duration::from_secs(5));
    let dns_total = dns.queries();
    drop(dns);

    // ---- report
    let find = |c: usize, path: &str| rows.iter().find(|r| r.c == c && r.path == path);
    let mut out = String::new();
    writeln!(out, "## relay_load: mailwarden in front of smtp-sink\n").unwrap();
    writeln!(
        out,
        "{MESSAGE_SIZE}-octet messages, one message per SMTP session (lockstep, no pipelining), \
         loopback; latency = connect .. 250 after end of DATA; {run_time:?} per run after a \
         {warm_time:?} warm-up, {repeats} runs per row interleaved across paths (median-throughput run shown); proxy logs at info to a file. `relay` = submission listener \
         (no verification), `inbound` = inbound listener (SPF/DKIM/DMARC against a local stub \
         DNS answering NXDOMAIN). {} cores shared by client, proxy and sink.\n",
        std::thread::available_parallelism().map_or(0, |n| n.get())
    )
    .unwrap();
    writeln!(
        out,
        "| concurrency | path | msg/s | msg/s range | vs direct | p50 ms | p99 ms | added p50 ms | \
         proxy CPU ms/msg | client+sink CPU ms/msg | DNS q/msg | errors |"
    )
    .unwrap();
    writeln!(
        out,
        "|---:|---|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|"
    )
    .unwrap();
    for r in &rows {
        let d = find(r.c, "direct").unwrap();
        let proxied = r.path != "direct";
        let opt = |v: f64| {
            if proxied {
                format!("{v:.3}")
            } else {
                "-".to_string()
            }
        };
        writeln!(
            out,
            "| {} | {} | {:.0} | {} | {} | {:.3} | {:.3} | {} | {} | {:.3} | {} | {} |",
            r.c,
            r.path,
            r.run.rate(),
            rates
                .iter()
                .find(|(c, p, _)| *c == r.c && *p == r.path)
                .map(|(_, _, all)| format!(
                    "{:.0}–{:.0}",
                    all.first().copied().unwrap_or(f64::NAN),
                    all.last().copied().unwrap_or(f64::NAN)
                ))
                .unwrap_or_default(),
            if proxied {
                format!("{:.2}", r.run.rate() / d.run.rate())
            } else {
                "1".to_string()
            },
            r.run.pct_ms(50.0),
            r.run.pct_ms(99.0),
            opt(r.run.pct_ms(50.0) - d.run.pct_ms(50.0)),
            opt(r.cpu[2]),
            r.cpu[0] + r.cpu[1],
            if proxied {
                format!("{:.3}", r.dns_per_msg)
            } else {
                "-".to_string()
            },
            r.run.errors,
        )
        .unwrap();
    }
    let rss_delta = idle.rss_after_kib as f64 - idle.rss_before_kib as f64;
    let per_session = rss_delta / idle.opened.max(1) as f64;
    writeln!(out).unwrap();
    writeln!(
        out,
        "Idle sessions (inbound listener, after EHLO): {} requested, {} opened, {} still answering NOOP; \
         proxy VmRSS {} KiB -> {} KiB = **{per_session:.1} KiB per idle session**. \
         Peak RSS of the load-test proxy (VmHWM): {proxy_hwm} KiB. \
         Stub DNS answered {dns_total} queries in all.",
        idle.sessions, idle.opened, idle.alive, idle.rss_before_kib, idle.rss_after_kib
    )
    .unwrap();
    if let Some(e) = &idle.first_error {
        writeln!(out, "Idle-session first error: {e}").unwrap();
    }
    if !proxy_warnings.is_empty() {
        writeln!(out, "\nFirst proxy WARN/ERROR log lines:").unwrap();
        for l in proxy_warnings {
            writeln!(out, "    {l}").unwrap();
        }
    }

    let verdict = |ok: bool| if ok { "met" } else { "NOT met" };
    writeln!(out, "\n| target | wanted | relay | | inbound | |").unwrap();
    writeln!(out, "|---|---|---:|---|---:|---|").unwrap();
    let mut line = |name: &str, wanted: String, f: &dyn Fn(&str) -> Option<(f64, bool)>| {
        let cell = |path: &str| match f(path) {
            Some((v, ok)) => format!("{v:.3} | {}", verdict(ok)),
            None => "n/a | ".to_string(),
        };
        writeln!(
            out,
            "| {name} | {wanted} | {} | {} |",
            cell("relay"),
            cell("inbound")
        )
        .unwrap();
    };
    line(
        "throughput at c=100, proxy/direct",
        format!(">= {TARGET_RATIO_C100:.2}"),
        &|path| {
            let (p, d) = (find(100, path)?, find(100, "direct")?);
            let ratio = p.run.rate() / d.run.rate();
            Some((ratio, ratio >= TARGET_RATIO_C100))
        },
    );
    line(
        "proxy CPU per message, worst concurrency (ms)",
        format!("<= {TARGET_CPU_MS_PER_MSG}"),
        &|path| {
            let worst = rows
                .iter()
                .filter(|r| r.path == path)
                .map(|r| r.cpu[2])
                .fold(f64::NAN, f64::max);
            Some((worst, worst <= TARGET_CPU_MS_PER_MSG))
        },
    );
    line(
        "added p50 latency at c=1 (ms)",
        format!("<= {TARGET_ADDED_LATENCY_MS_C1}"),
        &|path| {
            let (p, d) = (find(1, path)?, find(1, "direct")?);
            let added = p.run.pct_ms(50.0) - d.run.pct_ms(50.0);
            Some((added, added <= TARGET_ADDED_LATENCY_MS_C1))
        },
    );
    writeln!(
        out,
        "| RSS per idle session, {} sessions (KiB) | <= {TARGET_RSS_KB_PER_IDLE_SESSION} | | | {per_session:.1} | {} |",
        idle.sessions,
        verdict(idle.alive == idle.sessions && per_session <= TARGET_RSS_KB_PER_IDLE_SESSION)
    )
    .unwrap();
    if let Some(hs) = handshake_ms {
        // Per concurrency, CPU per TLS message against the bound built from the same
        // run's plain figure; the worst ratio is the one judged.
        let tls_ratio = |path: &str| {
            CONCURRENCY
                .iter()
                .filter_map(|&c| {
                    let plain = find(c, path)?.cpu[2];
                    let tls = find(c, &format!("{path}+tls"))?.cpu[2];
                    Some(tls / (hs + plain))
                })
                .fold(f64::NAN, f64::max)
        };
        let cell = |path: &str| {
            let r = tls_ratio(path);
            format!("{r:.2} | {}", verdict(r <= TARGET_TLS_FACTOR))
        };
        writeln!(
            out,
            "| STARTTLS: proxy CPU per message / (bare handshake {hs:.3} ms + plain CPU per message), worst concurrency | <= {TARGET_TLS_FACTOR} | {} | {} |",
            cell("relay"),
            cell("inbound")
        )
        .unwrap();
        writeln!(
            out,
            "\nBare rustls handshake, server side (same certificate, RSA-2048, and client configuration; in memory, median of 200): **{hs:.3} ms**."
        )
        .unwrap();
    }

    println!("{out}");
    if let Some(path) = std::env::var_os("RELAY_LOAD_OUT") {
        fs::write(&path, &out).expect("write RELAY_LOAD_OUT");
    }
}
