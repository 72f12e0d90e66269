//! Shared by `tests/admin_api.rs` and `tests/admin_browser.rs`: a proxy with the admin
//! server on, a policy that holds mail, and a tiny HTTP/1.1 client on tokio TCP (plain
//! or TLS) that sends the request target exactly as given (no normalisation), so the
//! tests can send `..%2f`, raw `..` segments and the like.
#![allow(dead_code)]

use std::net::SocketAddr;
use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::TcpStream;

use crate::common::dns::{DnsServer, Zone};
use crate::common::fake_mta::{FakeMta, Script};
use crate::common::{Proxy, ProxyOptions, STEP, free_addr, show};

/// The admin token of every test proxy (written to a 0600 file).
pub const TOKEN: &str = "test-admin-token-0123456789abcdef";
/// The proxy's host name (harness default).
pub const HELO: &str = "mx.client.example";

/// `accept.example` is let through; everything else is held.
pub const POLICY: &str = r#"
[[rule]]
name = "pass-partner"
from_domain = ["accept.example"]
action = "accept"

[[rule]]
name = "hold-all"
action = "quarantine"
reason = "held for review"
"#;

pub struct AdminEnv {
    pub dns: DnsServer,
    pub mta: FakeMta,
    pub proxy: Proxy,
    /// Where the admin server listens.
    pub admin: SocketAddr,
}

/// Options for [`start`].
pub struct AdminOptions {
    pub auth_fail_limit: u32,
    pub tls: bool,
    /// Extra `key = value` lines for `[admin]`.
    pub admin_extra: Vec<String>,
    /// A submission listener (outbound burst detection on, loopback trusted: the envelope
    /// sender is the account) instead of an inbound one.
    pub submission: bool,
    /// Extra `key = value` lines for `[limits]`.
    pub limits: Vec<String>,
}

impl Default for AdminOptions {
    fn default() -> Self {
        AdminOptions {
            auth_fail_limit: 10,
            tls: false,
            admin_extra: vec![],
            submission: false,
            limits: vec![],
        }
    }
}

fn zone() -> Zone {
    Zone::new()
        .txt("sender.example", "v=spf1 ip4:127.0.0.1 -all")
        .txt("accept.example", "v=spf1 ip4:127.0.0.1 -all")
}

/// Writes the 0600 token file, returns its path.
pub fn write_token(dir: &Path) -> std::path::PathBuf {
    let path = dir.join("admin.token");
    std::fs::write(&path, format!("{TOKEN}\n")).expect("write token");
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600)).expect("chmod");
    path
}

/// A proxy (auth on, inbound for example.org, the [`POLICY`]) with `[admin]` enabled on a
/// free loopback port, and a fake next hop.
pub async fn start(o: AdminOptions) -> AdminEnv {
    let dns = DnsServer::start(zone());
    let mta = FakeMta::start(Script::default()).await;
    let dir = tempfile::tempdir().expect("tempdir");
    let policy = dir.path().join("policy.toml");
    std::fs::write(&policy, POLICY).expect("write policy");
    let token = write_token(dir.path());
    let admin = free_addr();
    let mut opts = ProxyOptions::smtp(mta.addr);
    opts.auth = true;
    opts.role = if o.submission {
        "submission"
    } else {
        "inbound"
    }
    .into();
    opts.local_domains = vec!["example.org".into()];
    opts.dns_nameserver = Some(dns.nameserver());
    opts.auth_extra = vec![format!("policy_file = {:?}", policy.to_str().unwrap())];
    opts.limits = o.limits;
    let mut section = vec![
        "[admin]".to_string(),
        "enabled = true".to_string(),
        format!("listen = \"{admin}\""),
        format!("token_file = {:?}", token.to_str().unwrap()),
        format!("auth_fail_limit = {}", o.auth_fail_limit),
    ];
    if o.tls {
        section.push(format!(
            "tls_cert = {:?}",
            crate::common::cert_path().to_str().unwrap()
        ));
        section.push(format!(
            "tls_key = {:?}",
            crate::common::key_path().to_str().unwrap()
        ));
    }
    section.extend(o.admin_extra);
    if o.submission {
        section.push("[outbound]".into());
        section.push("trusted_networks = [\"127.0.0.0/8\"]".into());
    }
    opts.extra_toml = section;
    let proxy = Proxy::start_in(opts, dir).await;
    let env = AdminEnv {
        dns,
        mta,
        proxy,
        admin,
    };
    env.wait_admin(o.tls).await;
    env
}

impl AdminEnv {
    /// The SMTP listener is ready when `Proxy::start` returns; the admin one is bound
    /// before it (same start), but poll `/healthz` to be sure.
    async fn wait_admin(&self, tls: bool) {
        let deadline = std::time::Instant::now() + Duration::from_secs(30);
        loop {
            let ok = if tls {
                try_request_tls(self.admin, "GET", "/healthz", &[], None)
                    .await
                    .is_ok_and(|r| r.status == 200)
            } else {
                try_request(self.admin, "GET", "/healthz", &[], None)
                    .await
                    .is_ok_and(|r| r.status == 200)
            };
            if ok {
                return;
            }
            if std::time::Instant::now() > deadline {
                panic!(
                    "admin API at {} never answered /healthz\nlog:\n{}",
                    self.admin,
                    self.proxy.log()
                );
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// GET/POST with the token.
    pub async fn call(&self, method: &str, target: &str, body: Option<&[u8]>) -> HttpResponse {
        let auth = format!("Bearer {TOKEN}");
        let mut headers = vec![("Authorization", auth.as_str())];
        if body.is_some() {
            headers.push(("Content-Type", "application/json"));
        }
        request(self.admin, method, target, &headers, body).await
    }

    pub async fn get(&self, target: &str) -> HttpResponse {
        self.call("GET", target, None).await
    }

    pub async fn post(&self, target: &str, body: Option<&[u8]>) -> HttpResponse {
        self.call("POST", target, body).await
    }

    pub fn url(&self) -> String {
        format!("http://{}", self.admin)
    }

    /// Sends one message through the proxy; it must be held. Returns its quarantine id.
    pub async fn hold(&self, from: &str, rcpts: &[&str], msg: &[u8]) -> String {
        let r = self.send(from, rcpts, msg).await;
        let text = show(&r);
        text.strip_prefix("250 2.0.0 Ok: queued as ")
            .map(|s| s.trim().to_string())
            .filter(|id| id.len() == 26)
            .unwrap_or_else(|| {
                panic!(
                    "expected `250 2.0.0 Ok: queued as <ID>`, got {text:?}\nlog:\n{}",
                    self.proxy.log()
                )
            })
    }

    /// Sends one message; returns the raw end-of-data reply.
    pub async fn send(&self, from: &str, rcpts: &[&str], msg: &[u8]) -> Vec<u8> {
        let mut c = self.proxy.connect_ehlo(HELO).await;
        let r = c.send_mail(from, rcpts, msg).await;
        let q = c.cmd("QUIT").await;
        assert_eq!(q.code, 221);
        r.raw
    }
}

/// A plain-text message with a unique marker.
pub fn message(from: &str, to: &str, subject: &str, marker: &str) -> Vec<u8> {
    format!(
        "From: {from}\r\nTo: {to}\r\nSubject: {subject}\r\nDate: Tue, 25 Nov 2025 10:00:00 +0000\r\n\
         Message-ID: <{marker}@test.example>\r\nMIME-Version: 1.0\r\n\
         Content-Type: text/plain; charset=utf-8\r\n\r\n\
         Hello, this is {marker}.\r\nSecond line.\r\n"
    )
    .into_bytes()
}

// ---------------------------------------------------------------------------
// HTTP/1.1 client
// ---------------------------------------------------------------------------

#[derive(Debug)]
pub struct HttpResponse {
    pub status: u16,
    pub headers: Vec<(String, String)>,
    pub body: Vec<u8>,
}

impl HttpResponse {
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(k, _)| k.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }
    pub fn text(&self) -> String {
        show(&self.body)
    }
    #[track_caller]
    pub fn json(&self) -> serde_json::Value {
        serde_json::from_slice(&self.body)
            .unwrap_or_else(|e| panic!("not JSON ({e}): {}", self.text()))
    }
    /// The `error` code of a JSON error body.
    pub fn error_code(&self) -> String {
        serde_json::from_slice::<serde_json::Value>(&self.body)
            .ok()
            .and_then(|v| v["error"].as_str().map(str::to_string))
            .unwrap_or_default()
    }
}

pub async fn request(
    addr: SocketAddr,
    method: &str,
    target: &str,
    headers: &[(&str, &str)],
    body: Option<&[u8]>,
) -> HttpResponse {
    try_request(addr, method, target, headers, body)
        .await
        .unwrap_or_else(|e| panic!("{method} {target}: {e}"))
}

pub async fn try_request(
    addr: SocketAddr,
    method: &str,
    target: &str,
    headers: &[(&str, &str)],
    body: Option<&[u8]>,
) -> std::io::Result<HttpResponse> {
    let tcp = tokio::time::timeout(STEP, TcpStream::connect(addr))
        .await
        .map_err(|_| std::io::Error::other("connect timeout"))??;
    exchange(tcp, addr, method, target.as_bytes(), headers, body).await
}

/// Sends a request line whose target is these exact bytes (may be invalid UTF-8 / NUL).
pub async fn request_raw_target(addr: SocketAddr, target: &[u8]) -> std::io::Result<HttpResponse> {
    let tcp = TcpStream::connect(addr).await?;
    let auth = format!("Bearer {TOKEN}");
    exchange(tcp, addr, "GET", target, &[("Authorization", &auth)], None).await
}

pub async fn request_tls(
    addr: SocketAddr,
    method: &str,
    target: &str,
    headers: &[(&str, &str)],
    body: Option<&[u8]>,
) -> HttpResponse {
    try_request_tls(addr, method, target, headers, body)
        .await
        .unwrap_or_else(|e| panic!("{method} {target} (TLS): {e}"))
}

pub async fn try_request_tls(
    addr: SocketAddr,
    method: &str,
    target: &str,
    headers: &[(&str, &str)],
    body: Option<&[u8]>,
) -> std::io::Result<HttpResponse> {
    let tcp = TcpStream::connect(addr).await?;
    let connector = tokio_rustls::TlsConnector::from(crate::common::client_tls_config());
    let name = rustls::pki_types::ServerName::try_from("localhost").unwrap();
    let tls = tokio::time::timeout(STEP, connector.connect(name, tcp))
        .await
        .map_err(|_| std::io::Error::other("TLS timeout"))??;
    exchange(tls, addr, method, target.as_bytes(), headers, body).await
}

async fn exchange<S: AsyncRead + AsyncWrite + Unpin>(
    mut io: S,
    addr: SocketAddr,
    method: &str,
    target: &[u8],
    headers: &[(&str, &str)],
    body: Option<&[u8]>,
) -> std::io::Result<HttpResponse> {
    let mut req = Vec::new();
    req.extend_from_slice(method.as_bytes());
    req.push(b' ');
    req.extend_from_slice(target);
    req.extend_from_slice(b" HTTP/1.1\r\n");
    req.extend_from_slice(format!("Host: {addr}\r\nConnection: close\r\n").as_bytes());
    for (k, v) in headers {
        req.extend_from_slice(format!("{k}: {v}\r\n").as_bytes());
    }
    if let Some(b) = body {
        req.extend_from_slice(format!("Content-Length: {}\r\n", b.len()).as_bytes());
    } else if method == "POST" {
        req.extend_from_slice(b"Content-Length: 0\r\n");
    }
    req.extend_from_slice(b"\r\n");
    if let Some(b) = body {
        req.extend_from_slice(b);
    }
    io.write_all(&req).await?;
    io.flush().await?;
    let mut buf = Vec::new();
    let read = tokio::time::timeout(STEP, async {
        let mut chunk = [0u8; 16 * 1024];
        loop {
            match io.read(&mut chunk).await {
                Ok(0) => return Ok(()),
                Ok(n) => buf.extend_from_slice(&chunk[..n]),
                // A TLS peer closing without close_notify still ended the response.
                Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof && !buf.is_empty() => {
                    return Ok(());
                }
                Err(e) => return Err(e),
            }
        }
    })
    .await
    .map_err(|_| std::io::Error::other("response timeout"))?;
    read?;
    parse_response(&buf)
}

fn parse_response(buf: &[u8]) -> std::io::Result<HttpResponse> {
    let bad = |what: &str| std::io::Error::other(format!("bad response ({what}): {}", show(buf)));
    let end = crate::common::find(buf, b"\r\n\r\n").ok_or_else(|| bad("no header end"))?;
    let head = std::str::from_utf8(&buf[..end]).map_err(|_| bad("head not UTF-8"))?;
    let mut lines = head.split("\r\n");
    let status_line = lines.next().ok_or_else(|| bad("empty"))?;
    let status: u16 = status_line
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .ok_or_else(|| bad("status"))?;
    let headers: Vec<(String, String)> = lines
        .filter_map(|l| l.split_once(':'))
        .map(|(k, v)| (k.trim().to_string(), v.trim().to_string()))
        .collect();
    let raw = &buf[end + 4..];
    let chunked = headers.iter().any(|(k, v)| {
        k.eq_ignore_ascii_case("transfer-encoding") && v.eq_ignore_ascii_case("chunked")
    });
    let body = if chunked {
        dechunk(raw).ok_or_else(|| bad("chunked body"))?
    } else {
        raw.to_vec()
    };
    Ok(HttpResponse {
        status,
        headers,
        body,
    })
}

fn dechunk(mut raw: &[u8]) -> Option<Vec<u8>> {
    let mut out = Vec::new();
    loop {
        let line_end = crate::common::find(raw, b"\r\n")?;
        let size_text = std::str::from_utf8(&raw[..line_end]).ok()?;
        let size = usize::from_str_radix(size_text.split(';').next()?.trim(), 16).ok()?;
        raw = &raw[line_end + 2..];
        if size == 0 {
            return Some(out);
        }
        out.extend_from_slice(raw.get(..size)?);
        raw = raw.get(size + 2..)?;
    }
}

/// `name{labels} value` lines of a Prometheus/OpenMetrics exposition.
pub fn metric(exposition: &str, series: &str) -> f64 {
    exposition
        .lines()
        .filter(|l| !l.starts_with('#'))
        .find_map(|l| {
            let (name, value) = l.rsplit_once(' ')?;
            (name == series).then(|| value.parse().ok())?
        })
        .unwrap_or(0.0)
}

/// Runs `mailwarden run --config CONFIG` in `dir`, which must exit non-zero within 30 s
/// (a refused start); returns its stderr.
pub fn run_must_fail(dir: &Path, config: &Path) -> String {
    let mut command = std::process::Command::new(crate::common::bin());
    command
        .args(["run", "--config"])
        .arg(config)
        .current_dir(dir);
    let done = crate::common::run_bounded_blocking(command, dir, Duration::from_secs(30));
    let status = done
        .status
        .unwrap_or_else(|| panic!("mailwarden kept running:\n{}", done.stderr));
    assert!(!status.success(), "mailwarden started:\n{}", done.stderr);
    done.stderr
}
