//! Shared harness for the mailwarden integration tests.
//!
//! * [`Proxy`]: the real `mailwarden` binary, started with `run --config <tempfile>`,
//!   killed on drop.
//! * [`fake_mta::FakeMta`]: a scriptable next-hop SMTP server on loopback.
//! * [`smtp_client::Client`]: a tiny SMTP test client.
//!
//! Everything runs on 127.0.0.1 only.
#![allow(dead_code)]

// Re-exports used by some test crates only.
#[allow(unused_imports)]
pub mod dns;
pub mod fake_mta;
pub mod smtp_client;

use std::fmt::Write as _;
use std::io::{self, Read as _};
use std::net::{SocketAddr, TcpListener as StdListener};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName, UnixTime};
use rustls::{DigitallySignedStruct, SignatureScheme};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// Generous per-step timeout: every network read in the tests is bounded by this.
pub const STEP: Duration = Duration::from_secs(60);
/// Upper bound for a whole test body.
pub const TEST_BUDGET: Duration = Duration::from_secs(240);

/// Run a test body with an overall timeout so a test can never hang.
pub async fn bounded<F: std::future::Future<Output = ()>>(fut: F) {
    match tokio::time::timeout(TEST_BUDGET, fut).await {
        Ok(()) => {}
        Err(_) => panic!("test did not finish within {TEST_BUDGET:?}"),
    }
}

/// A free loopback port: bind 127.0.0.1:0 with std, read the port, drop the socket.
pub fn free_addr() -> SocketAddr {
    let l = StdListener::bind("127.0.0.1:0").expect("bind 127.0.0.1:0");
    l.local_addr().expect("local_addr")
}

/// A loopback UDP address where nothing listens.
pub fn dead_udp_addr() -> SocketAddr {
    let s = std::net::UdpSocket::bind("127.0.0.1:0").expect("bind udp 127.0.0.1:0");
    s.local_addr().expect("local_addr")
}

/// Path of a file in the repository (e.g. `certs/test-server.crt`).
pub fn repo_path(rel: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join(rel)
}

pub fn cert_path() -> PathBuf {
    repo_path("certs/test-server.crt")
}

pub fn key_path() -> PathBuf {
    repo_path("certs/test-server.key")
}

// ---------------------------------------------------------------------------
// TLS configurations (aws-lc-rs provider, no process-wide default needed)
// ---------------------------------------------------------------------------

fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::aws_lc_rs::default_provider())
}

/// Server config for the fake MTA, using certs/test-server.{crt,key}.
pub fn server_tls_config() -> Arc<rustls::ServerConfig> {
    let certs: Vec<CertificateDer<'static>> = CertificateDer::pem_file_iter(cert_path())
        .expect("open test cert")
        .collect::<Result<_, _>>()
        .expect("parse test cert");
    let key = PrivateKeyDer::from_pem_file(key_path()).expect("parse test key");
    let cfg = rustls::ServerConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()
        .expect("protocol versions")
        .with_no_client_auth()
        .with_single_cert(certs, key)
        .expect("server cert");
    Arc::new(cfg)
}

/// Trusts exactly certs/test-server.crt (pinned by its DER bytes; the test certificate
/// is self-signed with CA:TRUE, which webpki refuses as an end-entity certificate),
/// while still verifying the handshake signatures with the provider's algorithms.
#[derive(Debug)]
struct PinnedCert {
    der: Vec<u8>,
    provider: Arc<rustls::crypto::CryptoProvider>,
}

impl ServerCertVerifier for PinnedCert {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp: &[u8],
        _now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        if end_entity.as_ref() == self.der.as_slice() {
            Ok(ServerCertVerified::assertion())
        } else {
            Err(rustls::Error::InvalidCertificate(
                rustls::CertificateError::UnknownIssuer,
            ))
        }
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(
            message,
            cert,
            dss,
            &self.provider.signature_verification_algorithms,
        )
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(
            message,
            cert,
            dss,
            &self.provider.signature_verification_algorithms,
        )
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.provider
            .signature_verification_algorithms
            .supported_schemes()
    }
}

/// Client config trusting certs/test-server.crt.
pub fn client_tls_config() -> Arc<rustls::ClientConfig> {
    let der = CertificateDer::from_pem_file(cert_path())
        .expect("parse test cert")
        .as_ref()
        .to_vec();
    let p = provider();
    let cfg = rustls::ClientConfig::builder_with_provider(p.clone())
        .with_safe_default_protocol_versions()
        .expect("protocol versions")
        .dangerous()
        .with_custom_certificate_verifier(Arc::new(PinnedCert { der, provider: p }))
        .with_no_client_auth();
    Arc::new(cfg)
}

// ---------------------------------------------------------------------------
// A byte stream that is either plain TCP or TLS (client or server side)
// ---------------------------------------------------------------------------

pub enum Stream {
    Plain(TcpStream),
    ClientTls(Box<tokio_rustls::client::TlsStream<TcpStream>>),
    ServerTls(Box<tokio_rustls::server::TlsStream<TcpStream>>),
    Gone,
}

impl Stream {
    pub async fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        match self {
            Stream::Plain(s) => s.read(buf).await,
            Stream::ClientTls(s) => s.read(buf).await,
            Stream::ServerTls(s) => s.read(buf).await,
            Stream::Gone => Err(io::Error::new(io::ErrorKind::NotConnected, "gone")),
        }
    }

    pub async fn write_all(&mut self, data: &[u8]) -> io::Result<()> {
        match self {
            Stream::Plain(s) => {
                s.write_all(data).await?;
                s.flush().await
            }
            Stream::ClientTls(s) => {
                s.write_all(data).await?;
                s.flush().await
            }
            Stream::ServerTls(s) => {
                s.write_all(data).await?;
                s.flush().await
            }
            Stream::Gone => Err(io::Error::new(io::ErrorKind::NotConnected, "gone")),
        }
    }

    pub async fn shutdown(&mut self) {
        let _ = match self {
            Stream::Plain(s) => s.shutdown().await,
            Stream::ClientTls(s) => s.shutdown().await,
            Stream::ServerTls(s) => s.shutdown().await,
            Stream::Gone => Ok(()),
        };
    }

    pub fn is_tls(&self) -> bool {
        matches!(self, Stream::ClientTls(_) | Stream::ServerTls(_))
    }
}

// ---------------------------------------------------------------------------
// Proxy configuration template
// ---------------------------------------------------------------------------

/// Options rendered into the TOML config file given to `mailwarden run`.
#[derive(Clone, Debug)]
pub struct ProxyOptions {
    /// `[next_hop] address`: "smtp://127.0.0.1:PORT" or "maildir:PATH".
    pub next_hop: String,
    /// "submission" (default here: no local_domains restriction) or "inbound".
    pub role: String,
    pub local_domains: Vec<String>,
    /// Offer STARTTLS with certs/test-server.{crt,key}.
    pub starttls: bool,
    /// TLS from the first byte (implies the cert/key are configured).
    pub implicit_tls: bool,
    /// Expect a HAProxy PROXY header from `trusted_proxies`.
    pub proxy_protocol: bool,
    pub trusted_proxies: Vec<String>,
    pub max_sessions: Option<u32>,
    pub max_sessions_per_client: Option<u32>,
    /// `[next_hop] tls`: off | opportunistic | require.
    pub next_hop_tls: String,
    /// `[next_hop] xclient`: require | auto | off.
    pub xclient: String,
    /// Raw `key = value` lines appended to `[limits]`.
    pub limits: Vec<String>,
    /// Raw `key = value` lines appended to `[next_hop]` (override the defaults below).
    pub next_hop_extra: Vec<String>,
    pub grace_period: String,
    pub hostname: String,
    /// `[dns] nameservers` entry ("IP:PORT", e.g. a `dns::DnsServer`); None: a dead
    /// loopback UDP port, so nothing ever leaves the machine.
    pub dns_nameserver: Option<String>,
    /// `[auth] enabled`: sender authentication and policy. Off by default here so relay
    /// tests do not depend on DNS; the authentication tests turn it on.
    pub auth: bool,
    /// Raw `key = value` lines appended to `[auth]`.
    pub auth_extra: Vec<String>,
    /// Raw TOML appended at the end (whole sections such as `[spoof]`).
    pub extra_toml: Vec<String>,
    /// On a submission listener whose `extra_toml` has no `[outbound]` section: make
    /// loopback clients (and the documentation ranges) `[outbound] trusted_networks`
    /// (accounted, action `alert`, any From), so relay tests may submit without AUTH. Submission without AUTH from
    /// anyone else is refused (530 5.7.0). Default true.
    pub trusted_loopback: bool,
}

impl ProxyOptions {
    pub fn new(next_hop: impl Into<String>) -> Self {
        ProxyOptions {
            next_hop: next_hop.into(),
            role: "submission".into(),
            local_domains: vec![],
            starttls: false,
            implicit_tls: false,
            proxy_protocol: false,
            trusted_proxies: vec![],
            max_sessions: None,
            max_sessions_per_client: None,
            next_hop_tls: "off".into(),
            xclient: "require".into(),
            limits: vec![],
            next_hop_extra: vec![],
            grace_period: "30s".into(),
            hostname: "mailwarden.test".into(),
            dns_nameserver: None,
            auth: false,
            auth_extra: vec![],
            extra_toml: vec![],
            trusted_loopback: true,
        }
    }

    /// For a next hop that is a [`fake_mta::FakeMta`] at `addr`.
    pub fn smtp(addr: SocketAddr) -> Self {
        Self::new(format!("smtp://{addr}"))
    }

    pub fn limit(mut self, line: &str) -> Self {
        self.limits.push(line.to_string());
        self
    }

    pub fn next_hop_opt(mut self, line: &str) -> Self {
        self.next_hop_extra.push(line.to_string());
        self
    }

    fn render(&self, listen: SocketAddr) -> String {
        fn q(s: &str) -> String {
            // TOML basic string; test values never contain quotes or backslashes
            // except paths, which we escape.
            format!("\"{}\"", s.replace('\\', "\\\\").replace('"', "\\\""))
        }
        let mut c = String::new();
        writeln!(c, "hostname = {}", q(&self.hostname)).unwrap();
        let doms: Vec<String> = self.local_domains.iter().map(|d| q(d)).collect();
        writeln!(c, "local_domains = [{}]", doms.join(", ")).unwrap();
        writeln!(c).unwrap();
        writeln!(c, "[[listener]]").unwrap();
        writeln!(c, "address = {}", q(&listen.to_string())).unwrap();
        writeln!(c, "role = {}", q(&self.role)).unwrap();
        if self.starttls || self.implicit_tls {
            writeln!(c, "tls_cert = {}", q(&cert_path().to_string_lossy())).unwrap();
            writeln!(c, "tls_key = {}", q(&key_path().to_string_lossy())).unwrap();
        }
        if self.implicit_tls {
            writeln!(c, "implicit_tls = true").unwrap();
        }
        if self.proxy_protocol {
            writeln!(c, "proxy_protocol = true").unwrap();
            let tp: Vec<String> = self.trusted_proxies.iter().map(|d| q(d)).collect();
            writeln!(c, "trusted_proxies = [{}]", tp.join(", ")).unwrap();
        }
        if let Some(n) = self.max_sessions {
            writeln!(c, "max_sessions = {n}").unwrap();
        }
        if let Some(n) = self.max_sessions_per_client {
            writeln!(c, "max_sessions_per_client = {n}").unwrap();
        }
        writeln!(c).unwrap();
        writeln!(c, "[limits]").unwrap();
        for l in &self.limits {
            writeln!(c, "{l}").unwrap();
        }
        writeln!(c).unwrap();
        writeln!(c, "[next_hop]").unwrap();
        writeln!(c, "address = {}", q(&self.next_hop)).unwrap();
        writeln!(c, "tls = {}", q(&self.next_hop_tls)).unwrap();
        writeln!(c, "xclient = {}", q(&self.xclient)).unwrap();
        // Generous defaults (loopback only); tests that exercise a timeout override one.
        let defaults = [
            ("connect_timeout", "\"20s\""),
            ("greeting_timeout", "\"20s\""),
            ("command_timeout", "\"20s\""),
            ("data_timeout", "\"20s\""),
            ("end_of_data_timeout", "\"20s\""),
        ];
        for (k, v) in defaults {
            let overridden = self
                .next_hop_extra
                .iter()
                .any(|l| l.split('=').next().map(str::trim) == Some(k));
            if !overridden {
                writeln!(c, "{k} = {v}").unwrap();
            }
        }
        for l in &self.next_hop_extra {
            writeln!(c, "{l}").unwrap();
        }
        writeln!(c).unwrap();
        writeln!(c, "[shutdown]").unwrap();
        writeln!(c, "grace_period = {}", q(&self.grace_period)).unwrap();
        writeln!(c).unwrap();
        // Keep every lookup on loopback: a UDP port nobody listens on (queries fail fast
        // with "port unreachable"; nothing ever leaves the machine).
        writeln!(c, "[dns]").unwrap();
        let ns = self
            .dns_nameserver
            .clone()
            .unwrap_or_else(|| dead_udp_addr().to_string());
        writeln!(c, "nameservers = [{}]", q(&ns)).unwrap();
        writeln!(c).unwrap();
        writeln!(c, "[auth]").unwrap();
        writeln!(c, "enabled = {}", self.auth).unwrap();
        for l in &self.auth_extra {
            writeln!(c, "{l}").unwrap();
        }
        writeln!(c).unwrap();
        writeln!(c, "[log]").unwrap();
        writeln!(c, "level = \"info\"").unwrap();
        writeln!(c, "format = \"text\"").unwrap();
        let own_outbound = self
            .extra_toml
            .iter()
            .any(|t| t.lines().any(|l| l.trim() == "[outbound]"));
        if self.role == "submission" && self.trusted_loopback && !own_outbound {
            writeln!(c).unwrap();
            writeln!(c, "[outbound]").unwrap();
            // Loopback, and the documentation ranges tests use as client addresses
            // behind a PROXY header.
            writeln!(
                c,
                "trusted_networks = [\"127.0.0.0/8\", \"::1/128\", \"192.0.2.0/24\", \"198.51.100.0/24\", \"203.0.113.0/24\", \"2001:db8::/32\"]"
            )
            .unwrap();
            writeln!(c, "action = \"alert\"").unwrap();
            writeln!(c, "[outbound.from]").unwrap();
            writeln!(c, "allow = \"any\"").unwrap();
            writeln!(c, "action = \"alert\"").unwrap();
        }
        for t in &self.extra_toml {
            writeln!(c, "{t}").unwrap();
        }
        c
    }
}

// ---------------------------------------------------------------------------
// The proxy process guard
// ---------------------------------------------------------------------------

pub fn bin() -> &'static str {
    env!("CARGO_BIN_EXE_mailwarden")
}

/// The real `mailwarden` binary, running `run --config <tempfile>`. Killed on drop.
pub struct Proxy {
    child: Option<Child>,
    pub addr: SocketAddr,
    pub dir: tempfile::TempDir,
    pub config_path: PathBuf,
    pub stderr_path: PathBuf,
    pub config_text: String,
    pub implicit_tls: bool,
    pub proxy_protocol: bool,
}

impl Proxy {
    /// Write the config, spawn the binary and wait until the listener greets.
    pub async fn start(opts: ProxyOptions) -> Proxy {
        let dir = tempfile::tempdir().expect("tempdir");
        Self::start_in(opts, dir).await
    }

    /// Like [`Proxy::start`] but with a caller-provided directory (e.g. one that also
    /// holds the maildir).
    pub async fn start_in(opts: ProxyOptions, dir: tempfile::TempDir) -> Proxy {
        Self::launch(opts, dir, |text| text, None, &[]).await
    }

    /// Writes the config (rendered, then passed through `edit`), spawns the binary in
    /// `dir` and waits until it greets. With a `prelude` (shell commands, e.g. a umask
    /// or a mount), `sh` runs it first and then `exec`s the binary; `sh` itself runs
    /// under `wrapper` (a program that execs its arguments, e.g. `unshare`). Every step
    /// execs the next, so the pid is the proxy's.
    async fn launch(
        opts: ProxyOptions,
        dir: tempfile::TempDir,
        edit: impl FnOnce(String) -> String,
        prelude: Option<&str>,
        wrapper: &[&str],
    ) -> Proxy {
        let addr = free_addr();
        let config_text = edit(opts.render(addr));
        let config_path = dir.path().join("mailwarden.toml");
        std::fs::write(&config_path, &config_text).expect("write config");
        let stderr_path = dir.path().join("stderr.log");
        let stderr = std::fs::File::create(&stderr_path).expect("create stderr file");
        let mut command = match prelude {
            None => {
                let mut c = Command::new(bin());
                c.arg("run").arg("--config").arg(&config_path);
                c
            }
            Some(prelude) => {
                let (program, args) = wrapper.split_first().unwrap_or((&"sh", &[]));
                let mut c = Command::new(program);
                c.args(args);
                if !wrapper.is_empty() {
                    c.arg("sh");
                }
                c.arg("-c")
                    .arg(format!("{prelude} && exec \"$0\" run --config \"$1\""))
                    .arg(bin())
                    .arg(&config_path);
                c
            }
        };
        let child = command
            .current_dir(dir.path())
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::from(stderr))
            .spawn()
            .expect("spawn mailwarden");
        let mut p = Proxy {
            child: Some(child),
            addr,
            dir,
            config_path,
            stderr_path,
            config_text,
            implicit_tls: opts.implicit_tls,
            proxy_protocol: opts.proxy_protocol,
        };
        p.wait_ready().await;
        p
    }

    /// Poll-connect until the listener accepts and sends a 220 greeting; then QUIT that
    /// probe session cleanly (read to EOF so the server has released it).
    async fn wait_ready(&mut self) {
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            if let Some(status) = self.try_status() {
                panic!(
                    "mailwarden exited before accepting connections: {status}\nconfig:\n{}\nstderr:\n{}",
                    self.config_text,
                    self.log()
                );
            }
            if Instant::now() > deadline {
                panic!(
                    "mailwarden did not accept connections on {} within 60s\nstderr:\n{}",
                    self.addr,
                    self.log()
                );
            }
            if let Ok(Ok(s)) =
                tokio::time::timeout(Duration::from_secs(2), TcpStream::connect(self.addr)).await
            {
                if self.proxy_protocol {
                    // A PROXY-protocol listener expects a header first: a TCP connect
                    // is the only neutral probe.
                    drop(s);
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    return;
                }
                let mut c = smtp_client::Client::from_tcp(s);
                if self.implicit_tls {
                    c.upgrade_tls().await;
                }
                let greet = c.read_reply().await;
                assert_eq!(
                    greet.code,
                    220,
                    "readiness probe: unexpected greeting {greet:?}\nstderr:\n{}",
                    self.log()
                );
                let q = c.cmd("QUIT").await;
                assert_eq!(q.code, 221, "readiness probe QUIT: {q:?}");
                c.expect_eof().await;
                // Give the server a moment to drop its session bookkeeping.
                tokio::time::sleep(Duration::from_millis(100)).await;
                return;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// Everything the process wrote to stderr so far.
    pub fn log(&self) -> String {
        let mut s = String::new();
        if let Ok(mut f) = std::fs::File::open(&self.stderr_path) {
            let _ = f.read_to_string(&mut s);
        }
        s
    }

    pub fn pid(&self) -> u32 {
        self.child.as_ref().expect("child").id()
    }

    fn try_status(&mut self) -> Option<ExitStatus> {
        self.child
            .as_mut()
            .and_then(|c| c.try_wait().ok().flatten())
    }

    /// Send SIGTERM via the `kill` utility (no unsafe, no nix).
    pub fn sigterm(&self) {
        let st = Command::new("kill")
            .arg("-TERM")
            .arg(self.pid().to_string())
            .status()
            .expect("run kill -TERM");
        assert!(st.success(), "kill -TERM failed: {st}");
    }

    /// Wait (polling, without blocking the runtime) for the process to exit.
    pub async fn wait_exit(&mut self, timeout: Duration) -> ExitStatus {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(st) = self.try_status() {
                return st;
            }
            if Instant::now() > deadline {
                panic!(
                    "mailwarden did not exit within {timeout:?}\nstderr:\n{}",
                    self.log()
                );
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// Wait until the log contains `needle` (log lines are flushed asynchronously).
    pub async fn wait_log(&self, needle: &str, timeout: Duration) -> String {
        let deadline = Instant::now() + timeout;
        loop {
            let l = self.log();
            if l.contains(needle) {
                return l;
            }
            if Instant::now() > deadline {
                panic!("log never contained {needle:?} within {timeout:?}; stderr:\n{l}");
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    pub async fn connect(&self) -> smtp_client::Client {
        smtp_client::Client::connect(self.addr).await
    }

    /// Connect; on an implicit-TLS listener also run the TLS handshake.
    pub async fn connect_any(&self) -> smtp_client::Client {
        let mut c = self.connect().await;
        if self.implicit_tls {
            c.upgrade_tls().await;
        }
        c
    }

    /// Connect, read the greeting (must be 220) and EHLO (must be 250).
    pub async fn connect_ehlo(&self, name: &str) -> smtp_client::Client {
        let mut c = self.connect_any().await;
        let g = c.read_reply().await;
        assert_eq!(g.code, 220, "greeting: {g:?}");
        let r = c.cmd(&format!("EHLO {name}")).await;
        assert_eq!(r.code, 250, "EHLO: {r:?}");
        c
    }
}

impl Drop for Proxy {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            if c.try_wait().ok().flatten().is_none() {
                let _ = c.kill();
            }
            let _ = c.wait();
        }
    }
}

// ---------------------------------------------------------------------------
// Assertions on bytes
// ---------------------------------------------------------------------------

/// Panics unless every CR is followed by LF and every LF is preceded by CR.
pub fn assert_canonical_crlf(what: &str, bytes: &[u8]) {
    for (i, &b) in bytes.iter().enumerate() {
        if b == b'\r' && bytes.get(i + 1) != Some(&b'\n') {
            panic!(
                "{what}: bare CR at offset {i}: {:?}",
                show(&bytes[i.saturating_sub(40)..(i + 40).min(bytes.len())])
            );
        }
        if b == b'\n' && (i == 0 || bytes[i - 1] != b'\r') {
            panic!(
                "{what}: bare LF at offset {i}: {:?}",
                show(&bytes[i.saturating_sub(40)..(i + 40).min(bytes.len())])
            );
        }
    }
}

pub fn show(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}

pub fn contains(hay: &[u8], needle: &[u8]) -> bool {
    find(hay, needle).is_some()
}

pub fn find(hay: &[u8], needle: &[u8]) -> Option<usize> {
    if needle.is_empty() {
        return Some(0);
    }
    hay.windows(needle.len()).position(|w| w == needle)
}

pub fn count(hay: &[u8], needle: &[u8]) -> usize {
    if needle.is_empty() || hay.len() < needle.len() {
        return 0;
    }
    hay.windows(needle.len()).filter(|w| *w == needle).count()
}

// ---------------------------------------------------------------------------
// Setup shortcuts
// ---------------------------------------------------------------------------

/// A fake next hop with `script` and a proxy relaying to it (default options).
pub async fn setup(script: fake_mta::Script) -> (fake_mta::FakeMta, Proxy) {
    setup_with(script, |o| o).await
}

/// Same, with the proxy options adjusted by `f`.
pub async fn setup_with(
    script: fake_mta::Script,
    f: impl FnOnce(ProxyOptions) -> ProxyOptions,
) -> (fake_mta::FakeMta, Proxy) {
    let mta = fake_mta::FakeMta::start(script).await;
    let proxy = Proxy::start(f(ProxyOptions::smtp(mta.addr))).await;
    (mta, proxy)
}

/// Canonical-transcript check over everything the next hop received, plus the rule that
/// every command line mailwarden sent is at most 512 octets (RFC 5321 4.5.3.1.4).
pub fn assert_next_hop_canonical(mta: &fake_mta::FakeMta) {
    for c in mta.conns() {
        assert_canonical_crlf(
            &format!("next-hop connection {} transcript", c.id),
            &c.transcript,
        );
        for cmd in &c.commands {
            assert!(
                cmd.len() + 2 <= 512,
                "next-hop command longer than 512 octets: {cmd:?}"
            );
        }
    }
    for m in mta.messages() {
        assert_canonical_crlf("message content at the next hop", &m.raw);
    }
}

// ---------------------------------------------------------------------------
// Edited configs (keys of tables the template writes itself, e.g. `[dns] timeout_ms`)
// ---------------------------------------------------------------------------

impl Proxy {
    /// Like [`Proxy::start`], with the rendered config text passed through `edit` first.
    pub async fn start_edited(opts: ProxyOptions, edit: impl FnOnce(String) -> String) -> Proxy {
        let dir = tempfile::tempdir().expect("tempdir");
        Self::launch(opts, dir, edit, None, &[]).await
    }
}

// ---------------------------------------------------------------------------
// A proxy started under a given umask (file-permission tests)
// ---------------------------------------------------------------------------

impl Proxy {
    /// Like [`Proxy::start_in`], but the binary runs under `umask` (set by `sh`, which
    /// then `exec`s it, so the pid is the proxy's): files it creates without an explicit
    /// mode show up as group- or world-accessible.
    pub async fn start_in_with_umask(
        opts: ProxyOptions,
        dir: tempfile::TempDir,
        umask: u32,
    ) -> Proxy {
        Self::launch(
            opts,
            dir,
            |text| text,
            Some(&format!("umask {umask:03o}")),
            &[],
        )
        .await
    }

    /// Like [`Proxy::start_in`], but in a mount namespace of its own (`unshare`, which
    /// needs root or user namespaces), where `sh` runs `prelude` in `dir` first (e.g. a
    /// mount only the proxy sees) and then `exec`s the binary. The proxy's view of its
    /// files is under `/proc/<pid>/root`.
    pub async fn start_in_own_mounts(
        opts: ProxyOptions,
        dir: tempfile::TempDir,
        prelude: &str,
    ) -> Proxy {
        let unshare = ["unshare", "--mount", "--propagation", "private", "--"];
        Self::launch(opts, dir, |text| text, Some(prelude), &unshare).await
    }
}

/// Peak and current resident set size of a process, in KiB.
pub fn rss_kib(pid: u32) -> (u64, u64) {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    let field = |name: &str| {
        status
            .lines()
            .find_map(|l| l.strip_prefix(name))
            .and_then(|v| v.split_whitespace().next()?.parse().ok())
            .unwrap_or(0)
    };
    (field("VmHWM:"), field("VmRSS:"))
}

// ---------------------------------------------------------------------------
// One-shot commands (the CLI, `check`, a `run` that must fail), bounded in time
// ---------------------------------------------------------------------------

/// How a bounded command ended.
pub struct Finished {
    /// `None`: still running at the deadline, so it was killed.
    pub status: Option<ExitStatus>,
    pub stdout: Vec<u8>,
    pub stderr: String,
}

impl Finished {
    pub fn success(&self) -> bool {
        self.status.is_some_and(|s| s.success())
    }

    pub fn stdout_text(&self) -> String {
        String::from_utf8_lossy(&self.stdout).into_owned()
    }
}

/// Runs `command` with stdin closed and stdout/stderr going to fresh files in `dir` (no
/// pipe can fill up and block it), polling until it exits; kills it at `deadline`.
pub fn run_bounded_blocking(mut command: Command, dir: &Path, deadline: Duration) -> Finished {
    static RUNS: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);
    let n = RUNS.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    let tag = format!("cmd-{}-{n}", std::process::id());
    let out_path = dir.join(format!("{tag}.stdout"));
    let err_path = dir.join(format!("{tag}.stderr"));
    let mut child = command
        .stdin(Stdio::null())
        .stdout(std::fs::File::create(&out_path).expect("stdout file"))
        .stderr(std::fs::File::create(&err_path).expect("stderr file"))
        .spawn()
        .unwrap_or_else(|e| panic!("spawn {command:?}: {e}"));
    let started = Instant::now();
    let status = loop {
        if let Some(st) = child.try_wait().expect("try_wait") {
            break Some(st);
        }
        if started.elapsed() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            break None;
        }
        std::thread::sleep(Duration::from_millis(10));
    };
    Finished {
        status,
        stdout: std::fs::read(&out_path).unwrap_or_default(),
        stderr: std::fs::read_to_string(&err_path).unwrap_or_default(),
    }
}

/// [`run_bounded_blocking`] on a blocking thread, so the test's runtime (a fake MTA, a
/// DNS server) keeps running meanwhile.
pub async fn run_bounded(command: Command, dir: &Path, deadline: Duration) -> Finished {
    let dir = dir.to_path_buf();
    tokio::task::spawn_blocking(move || run_bounded_blocking(command, &dir, deadline))
        .await
        .expect("command thread")
}

/// A python3 that can `import <imports>`: the Debian one first (python3-dkim and friends
/// install there), then whatever `python3` is on PATH. Panics with `hint` when neither can.
#[allow(dead_code)] // not every test file runs Python
pub fn python_with(imports: &str, hint: &str) -> String {
    for p in ["/usr/bin/python3", "python3"] {
        let ok = Command::new(p)
            .args(["-c", &format!("import {imports}")])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
            .is_ok_and(|s| s.success());
        if ok {
            return p.to_string();
        }
    }
    panic!("{hint}");
}
