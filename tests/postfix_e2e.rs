//! End-to-end test against a real Postfix.
//!
//! client (bound to 127.0.0.2) -> mailwarden (127.0.0.1, `xclient = "require"`)
//! -> private Postfix instance (smtpd on a free 127.0.0.1 port, XCLIENT allowed
//! from 127.0.0.0/8) -> virtual(8) delivery into a Maildir under a tempdir.
//!
//! Checks that every delivered copy is byte-for-byte the message the client sent
//! (after dot-unstuffing and Postfix's CRLF -> LF conversion), apart from the
//! trace headers Postfix prepends, and that Postfix attributes the message to the
//! original client address 127.0.0.2 (its `QUEUEID: client=...[127.0.0.2]` log
//! line and its Received header), not to the proxy's 127.0.0.1.
//!
//! Needs Debian's postfix package and root (Postfix drops to mail_owner=postfix
//! and delivers as `nobody`). CI installs it with
//! `DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends postfix`.
//! A missing Postfix is a test FAILURE, not a skip.
//!
//! The private instance has its own config_directory, queue_directory and
//! data_directory, listens only on 127.0.0.1, has no outbound transports
//! (default/relay/local transports are `error:`) and never does DNS lookups.
//! It is stopped (`postfix stop`, then `postfix abort`, then SIGKILL of master)
//! when the test ends, also on panic.
//!
//! The README's Postfix recipe (issue 19) is run as written: [`recipe`] reads its
//! `master.cf`, `main.cf`, `smtpd.conf`, users and `mailwarden.toml` blocks from README.md,
//! and only ports, paths and the domain are substituted. That instance has both roles
//! (an inbound smtpd, a submission smtpd with Cyrus SASL over a sasldb, Debian's
//! `sasl2-bin` and `libsasl2-modules`) and `mynetworks = 127.0.0.1/32` (this host only).

mod common;
#[path = "common/stub_dns.rs"]
mod stub_dns;

use std::fmt::Write as _;
use std::fs;
use std::io::{BufRead, BufReader, Read, Write};
use std::net::{Ipv4Addr, SocketAddr, TcpListener, TcpStream};
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

use stub_dns::StubDns;

const APT_LINE: &str =
    "DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends postfix";
const DOMAIN: &str = "example.test";
const POSTFIX_HOSTNAME: &str = "postfix-e2e.example.test";
const CLIENT_IP: Ipv4Addr = Ipv4Addr::new(127, 0, 0, 2);
const IO_TIMEOUT: Duration = Duration::from_secs(30);
const DELIVERY_TIMEOUT: Duration = Duration::from_secs(60);

// ---------------------------------------------------------------------------
// helpers

fn find_program(name: &str) -> Option<PathBuf> {
    let mut dirs: Vec<PathBuf> = vec!["/usr/sbin".into(), "/usr/bin".into(), "/sbin".into()];
    if let Some(path) = std::env::var_os("PATH") {
        dirs.extend(std::env::split_paths(&path));
    }
    dirs.into_iter().map(|d| d.join(name)).find(|p| p.is_file())
}

fn require_program(name: &str) -> PathBuf {
    find_program(name).unwrap_or_else(|| {
        panic!(
            "`{name}` not found: Postfix is not installed. This test needs Debian's postfix \
             package; install it with `{APT_LINE}` (CI's .ci/run does this)."
        )
    })
}

fn effective_uid() -> u32 {
    let status = fs::read_to_string("/proc/self/status").expect("read /proc/self/status");
    status
        .lines()
        .find_map(|l| l.strip_prefix("Uid:"))
        .and_then(|rest| rest.split_whitespace().nth(1))
        .and_then(|v| v.parse().ok())
        .expect("parse effective uid from /proc/self/status")
}

/// uid/gid of `nobody` (virtual(8) delivers as this user; it must be >= 100).
fn nobody_ids() -> (u32, u32) {
    let passwd = fs::read_to_string("/etc/passwd").unwrap_or_default();
    passwd
        .lines()
        .find_map(|l| {
            let f: Vec<&str> = l.split(':').collect();
            (f.len() >= 4 && f[0] == "nobody").then(|| (f[2].parse().ok(), f[3].parse().ok()))
        })
        .and_then(|(u, g)| Some((u?, g?)))
        .unwrap_or((65534, 65534))
}

fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("bind an ephemeral port on 127.0.0.1")
        .port()
}

fn run(cmd: &mut Command) -> Output {
    cmd.stdin(Stdio::null())
        .output()
        .unwrap_or_else(|e| panic!("spawn {cmd:?}: {e}"))
}

fn describe(out: &Output) -> String {
    format!(
        "status {}, stdout: {}, stderr: {}",
        out.status,
        String::from_utf8_lossy(&out.stdout).trim(),
        String::from_utf8_lossy(&out.stderr).trim()
    )
}

fn pid_alive(pid: u32) -> bool {
    // A zombie still has /proc/PID; treat state Z as dead.
    match fs::read_to_string(format!("/proc/{pid}/stat")) {
        Ok(stat) => !stat
            .rsplit_once(')')
            .map(|(_, rest)| rest.trim_start().starts_with('Z'))
            .unwrap_or(false),
        Err(_) => false,
    }
}

fn wait_until(timeout: Duration, mut f: impl FnMut() -> bool) -> bool {
    let deadline = Instant::now() + timeout;
    loop {
        if f() {
            return true;
        }
        if Instant::now() >= deadline {
            return false;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// The fenced block after `<!-- recipe: NAME -->` in README.md.
fn recipe(name: &str) -> String {
    let readme = fs::read_to_string(Path::new(env!("CARGO_MANIFEST_DIR")).join("README.md"))
        .expect("read README.md");
    let marker = format!("<!-- recipe: {name} -->");
    let after = readme
        .split_once(&marker)
        .unwrap_or_else(|| panic!("README.md has no `{marker}`"))
        .1;
    let fence = after.find("```").expect("a fenced block after the marker");
    let body = &after[fence..];
    let body = &body[body.find('\n').expect("fence line") + 1..];
    let end = body.find("\n```").expect("closing fence");
    format!("{}\n", &body[..end])
}

/// The recipe's user (README: `alice`), in the test's domain.
const SASL_LOCAL: &str = "alice";
const SASL_PASSWORD: &str = "Tapir-Lantern-2026-recipe";

// ---------------------------------------------------------------------------
// private Postfix instance

struct Postfix {
    postfix_bin: PathBuf,
    root: PathBuf,
    config_dir: PathBuf,
    queue_dir: PathBuf,
    maildir_base: PathBuf,
    maillog: PathBuf,
    port: u16,
    running: bool,
}

impl Postfix {
    /// Configure and start a private instance under `root`, retrying with a new
    /// port if the one picked was taken in the meantime.
    /// `xclient_hosts`: value of smtpd_authorized_xclient_hosts.
    fn start(root: &Path, mailboxes: &[&str], xclient_hosts: &str) -> Postfix {
        let postfix_bin = require_program("postfix");
        require_program("postconf");
        assert_eq!(
            effective_uid(),
            0,
            "the Postfix end-to-end test must run as root (it starts a private Postfix instance)"
        );
        let mut last_error = String::new();
        for attempt in 0..3 {
            let dir = root.join(format!("postfix{attempt}"));
            let mut pf = Postfix {
                postfix_bin: postfix_bin.clone(),
                config_dir: dir.join("etc"),
                queue_dir: dir.join("queue"),
                maildir_base: dir.join("maildir"),
                maillog: dir.join("maillog"),
                root: dir,
                port: free_port(),
                running: false,
            };
            pf.write_config(mailboxes, xclient_hosts);
            match pf.try_start() {
                Ok(()) => return pf,
                Err(e) => {
                    last_error = e;
                    pf.stop();
                }
            }
        }
        panic!("could not start a private Postfix instance: {last_error}");
    }

    fn write_config(&self, mailboxes: &[&str], xclient_hosts: &str) {
        let (uid, gid) = nobody_ids();
        let data_dir = self.root.join("data");
        for d in [
            &self.root,
            &self.config_dir,
            &self.queue_dir,
            &data_dir,
            &self.maildir_base,
        ] {
            fs::create_dir_all(d).unwrap();
            fs::set_permissions(d, fs::Permissions::from_mode(0o755)).unwrap();
        }
        let postfix_ids = fs::read_to_string("/etc/passwd")
            .unwrap_or_default()
            .lines()
            .find_map(|l| {
                let f: Vec<&str> = l.split(':').collect();
                (f.len() >= 4 && f[0] == "postfix")
                    .then(|| Some((f[2].parse::<u32>().ok()?, f[3].parse::<u32>().ok()?)))
                    .flatten()
            })
            .expect("user `postfix` missing from /etc/passwd: is the postfix package installed?");
        std::os::unix::fs::chown(&data_dir, Some(postfix_ids.0), Some(postfix_ids.1)).unwrap();
        std::os::unix::fs::chown(&self.maildir_base, Some(uid), Some(gid)).unwrap();

        let d = |p: &Path| p.display().to_string();
        let main_cf = format!(
            "# private instance for mailwarden's tests/postfix_e2e.rs\n\
             compatibility_level = 3.6\n\
             queue_directory = {queue}\n\
             data_directory = {data}\n\
             mail_owner = postfix\n\
             setgid_group = postdrop\n\
             myhostname = {POSTFIX_HOSTNAME}\n\
             mydomain = {DOMAIN}\n\
             myorigin = $myhostname\n\
             mydestination =\n\
             relay_domains =\n\
             relayhost =\n\
             mynetworks = 127.0.0.0/8\n\
             inet_interfaces = loopback-only\n\
             inet_protocols = ipv4\n\
             smtp_dns_support_level = disabled\n\
             smtp_host_lookup = native\n\
             smtpd_peername_lookup = no\n\
             default_transport = error:no outbound delivery from the test instance\n\
             relay_transport = error:no relay from the test instance\n\
             local_transport = error:no local delivery in the test instance\n\
             alias_maps =\n\
             alias_database =\n\
             biff = no\n\
             append_dot_mydomain = no\n\
             local_header_rewrite_clients =\n\
             smtpd_authorized_xclient_hosts = {xclient_hosts}\n\
             smtpd_relay_restrictions = permit_mynetworks, reject_unauth_destination\n\
             smtpd_tls_security_level = none\n\
             smtp_tls_security_level = none\n\
             virtual_mailbox_domains = {DOMAIN}\n\
             virtual_mailbox_base = {base}\n\
             virtual_mailbox_maps = texthash:{vmailbox}\n\
             virtual_uid_maps = static:{uid}\n\
             virtual_gid_maps = static:{gid}\n\
             virtual_minimum_uid = 100\n\
             maillog_file = {maillog}\n\
             maillog_file_prefixes = {root}\n",
            queue = d(&self.queue_dir),
            data = d(&data_dir),
            base = d(&self.maildir_base),
            vmailbox = d(&self.config_dir.join("vmailbox")),
            maillog = d(&self.maillog),
            root = d(&self.root),
        );
        fs::write(self.config_dir.join("main.cf"), main_cf).unwrap();

        let mut vmailbox = String::new();
        for local in mailboxes {
            // trailing slash: Maildir format
            writeln!(vmailbox, "{local}@{DOMAIN} {local}/").unwrap();
        }
        fs::write(self.config_dir.join("vmailbox"), vmailbox).unwrap();

        // No chroot anywhere (column 5 = n): the instance lives in a tempdir.
        let master_cf = format!(
            "127.0.0.1:{port} inet n - n - - smtpd\n\
             pickup     unix n - n 60 1 pickup\n\
             cleanup    unix n - n - 0 cleanup\n\
             qmgr       unix n - n 300 1 qmgr\n\
             rewrite    unix - - n - - trivial-rewrite\n\
             bounce     unix - - n - 0 bounce\n\
             defer      unix - - n - 0 bounce\n\
             trace      unix - - n - 0 bounce\n\
             verify     unix - - n - 1 verify\n\
             flush      unix n - n 1000? 0 flush\n\
             proxymap   unix - - n - - proxymap\n\
             proxywrite unix - - n - 1 proxymap\n\
             smtp       unix - - n - - smtp\n\
             relay      unix - - n - - smtp\n\
             showq      unix n - n - - showq\n\
             error      unix - - n - - error\n\
             retry      unix - - n - - error\n\
             discard    unix - - n - - discard\n\
             local      unix - n n - - local\n\
             virtual    unix - n n - - virtual\n\
             anvil      unix - - n - 1 anvil\n\
             scache     unix - - n - 1 scache\n\
             postlog    unix-dgram n - n - 1 postlogd\n",
            port = self.port
        );
        fs::write(self.config_dir.join("master.cf"), master_cf).unwrap();
    }

    /// The README recipe's instance: its master.cf lines (inbound and submission smtpd on
    /// free ports), its main.cf and smtpd.conf lines, its sasldb commands for USER.
    /// Returns the instance (its `port` is the inbound smtpd) and the submission port.
    fn start_recipe(root: &Path, mailboxes: &[&str]) -> (Postfix, u16) {
        let postfix_bin = require_program("postfix");
        require_program("saslpasswd2");
        assert_eq!(
            effective_uid(),
            0,
            "the Postfix end-to-end test must run as root"
        );
        let mut last_error = String::new();
        for attempt in 0..3 {
            let dir = root.join(format!("recipe{attempt}"));
            let mut pf = Postfix {
                postfix_bin: postfix_bin.clone(),
                config_dir: dir.join("etc"),
                queue_dir: dir.join("queue"),
                maildir_base: dir.join("maildir"),
                maillog: dir.join("maillog"),
                root: dir,
                port: free_port(),
                running: false,
            };
            let submission_port = free_port();
            pf.write_config(mailboxes, "");
            pf.apply_recipe(submission_port);
            match pf.try_start() {
                Ok(()) => return (pf, submission_port),
                Err(e) => {
                    last_error = e;
                    pf.stop();
                }
            }
        }
        panic!("could not start the recipe's Postfix instance: {last_error}");
    }

    /// Rewrites the instance's files with the README's recipe blocks.
    fn apply_recipe(&self, submission_port: u16) {
        let sasl_dir = self.config_dir.join("sasl");
        fs::create_dir_all(&sasl_dir).unwrap();
        fs::set_permissions(&sasl_dir, fs::Permissions::from_mode(0o755)).unwrap();
        let sasl = sasl_dir.display().to_string();
        let paths = |text: String| text.replace("/etc/postfix/sasl", &sasl);

        // master.cf: the recipe's two smtpd services replace the test's single one.
        let services = recipe("master.cf")
            .replace("127.0.0.1:10025", &format!("127.0.0.1:{}", self.port))
            .replace("127.0.0.1:10587", &format!("127.0.0.1:{submission_port}"));
        let master = fs::read_to_string(self.config_dir.join("master.cf")).unwrap();
        let rest: String = master.lines().skip(1).map(|l| format!("{l}\n")).collect();
        fs::write(
            self.config_dir.join("master.cf"),
            format!("{services}{rest}"),
        )
        .unwrap();

        // main.cf: the recipe's lines, and this host only in mynetworks (the default
        // `mynetworks_style = host`); later lines win in main.cf.
        let mut main: String = fs::read_to_string(self.config_dir.join("main.cf"))
            .unwrap()
            .lines()
            .filter(|l| !l.starts_with("mynetworks ") && !l.starts_with("default_transport "))
            .map(|l| format!("{l}\n"))
            .collect();
        main.push_str("mynetworks = 127.0.0.1/32\n");
        // Remote recipients are accepted and dropped (nothing leaves the machine): the
        // `error:` transport would make smtpd refuse them at RCPT.
        main.push_str("default_transport = discard:remote mail discarded by the test instance\n");
        main.push_str(&paths(recipe("main.cf")));
        fs::write(self.config_dir.join("main.cf"), main).unwrap();

        fs::write(sasl_dir.join("smtpd.conf"), paths(recipe("smtpd.conf"))).unwrap();
        // The users block, line by line: `saslpasswd2` reads the password from stdin
        // (`-p`, the one addition: the README's line prompts for it), `chown`/`chmod`
        // as written.
        for line in paths(recipe("users"))
            .lines()
            .filter(|l| !l.trim().is_empty())
        {
            let line = line
                .replace("example.org", DOMAIN)
                .replace(" alice", &format!(" {SASL_LOCAL}"));
            let mut words = line.split_whitespace();
            let program = words.next().unwrap();
            let mut args: Vec<&str> = words.collect();
            if program == "saslpasswd2" {
                args.insert(0, "-p");
            }
            let mut child = Command::new(require_program(program))
                .args(&args)
                .stdin(Stdio::piped())
                .stdout(Stdio::piped())
                .stderr(Stdio::piped())
                .spawn()
                .unwrap_or_else(|e| panic!("{line}: {e}"));
            if program == "saslpasswd2" {
                child
                    .stdin
                    .take()
                    .unwrap()
                    .write_all(format!("{SASL_PASSWORD}\n").as_bytes())
                    .unwrap();
            }
            let out = child.wait_with_output().unwrap();
            assert!(out.status.success(), "{line}: {}", describe(&out));
        }
    }

    fn postfix(&self, action: &str) -> Output {
        run(Command::new(&self.postfix_bin)
            .arg("-c")
            .arg(&self.config_dir)
            .arg(action)
            .env_remove("MAIL_CONFIG"))
    }

    fn try_start(&mut self) -> Result<(), String> {
        let check = self.postfix("check");
        if !check.status.success() {
            return Err(format!("`postfix check` failed: {}", describe(&check)));
        }
        let out = self.postfix("start");
        self.running = true; // even a failed start may have left a master behind
        if !out.status.success() {
            return Err(format!(
                "`postfix start` failed: {}\n{}",
                describe(&out),
                self.log()
            ));
        }
        // Ready when smtpd answers with a 220 greeting.
        let mut last = String::new();
        let ready = wait_until(Duration::from_secs(30), || {
            match TcpStream::connect(("127.0.0.1", self.port)) {
                Ok(s) => {
                    s.set_read_timeout(Some(Duration::from_secs(5))).ok();
                    let mut line = String::new();
                    let _ = BufReader::new(&s).read_line(&mut line);
                    let _ = (&s).write_all(b"QUIT\r\n");
                    last = line.clone();
                    line.starts_with("220 ")
                }
                Err(e) => {
                    last = e.to_string();
                    false
                }
            }
        });
        if !ready {
            return Err(format!(
                "Postfix smtpd on 127.0.0.1:{} never greeted (last: {last})\n{}",
                self.port,
                self.log()
            ));
        }
        // postlogd must be working: the start-up line has to be in the maillog.
        if !wait_until(Duration::from_secs(10), || {
            self.log().contains("daemon started")
        }) {
            return Err(format!(
                "Postfix's maillog_file {} never got the master's start-up line; log so far:\n{}",
                self.maillog.display(),
                self.log()
            ));
        }
        Ok(())
    }

    fn log(&self) -> String {
        fs::read_to_string(&self.maillog).unwrap_or_else(|e| format!("<no maillog: {e}>"))
    }

    fn master_pid(&self) -> Option<u32> {
        fs::read_to_string(self.queue_dir.join("pid/master.pid"))
            .ok()?
            .trim()
            .parse()
            .ok()
    }

    fn stop(&mut self) {
        if !self.running {
            return;
        }
        self.running = false;
        let pid = self.master_pid();
        let gone = |pid: Option<u32>| pid.is_none_or(|p| !pid_alive(p));
        let _ = self.postfix("stop");
        if wait_until(Duration::from_secs(10), || gone(pid)) {
            return;
        }
        let _ = self.postfix("abort");
        if wait_until(Duration::from_secs(5), || gone(pid)) {
            return;
        }
        if let Some(p) = pid {
            let _ = run(Command::new("kill").arg("-KILL").arg(p.to_string()));
            wait_until(Duration::from_secs(5), || gone(Some(p)));
        }
    }

    fn maildir_new(&self, local: &str) -> PathBuf {
        self.maildir_base.join(local).join("new")
    }
}

impl Drop for Postfix {
    fn drop(&mut self) {
        self.stop();
    }
}

// ---------------------------------------------------------------------------
// mailwarden

struct Mailwarden {
    child: Child,
    port: u16,
    /// The recipe's submission listener (0: none).
    submission_port: u16,
    config: PathBuf,
    stderr_path: PathBuf,
    /// Its only DNS server; stopped after the child is killed.
    _dns: StubDns,
}

impl Mailwarden {
    fn start(dir: &Path, next_hop_port: u16) -> Mailwarden {
        Self::start_with(dir, |port, dns_port| {
            format!(
                "hostname = \"mailwarden.test\"\n\
                     local_domains = [\"{DOMAIN}\"]\n\
                     \n\
                     [[listener]]\n\
                     address = \"127.0.0.1:{port}\"\n\
                     role = \"inbound\"\n\
                     \n\
                     [next_hop]\n\
                     address = \"smtp://127.0.0.1:{next_hop_port}\"\n\
                     xclient = \"require\"\n\
                     tls = \"off\"\n\
                     connect_timeout = \"10s\"\n\
                     greeting_timeout = \"10s\"\n\
                     command_timeout = \"30s\"\n\
                     data_timeout = \"30s\"\n\
                     end_of_data_timeout = \"30s\"\n\
                     \n\
                     [dns]\n\
                     nameservers = [\"127.0.0.1:{dns_port}\"]\n\
                     timeout_ms = 2000\n\
                     attempts = 1\n\
                     \n\
                     [shutdown]\n\
                     grace_period = \"2s\"\n\
                     \n\
                     [log]\n\
                     level = \"debug\"\n"
            )
        })
    }

    /// The README recipe's `mailwarden.toml`, listeners moved to loopback ports, the
    /// test certificate, the Postfix ports and domain substituted; a loopback DNS added.
    fn start_recipe(dir: &Path, inbound_hop: u16, submission_hop: u16) -> Mailwarden {
        let submission_port = free_port();
        let cert = Path::new(env!("CARGO_MANIFEST_DIR")).join("certs/test-server.crt");
        let key = Path::new(env!("CARGO_MANIFEST_DIR")).join("certs/test-server.key");
        let mut mw = Self::start_with(dir, |port, dns_port| {
            let text = recipe("mailwarden.toml")
                .replace("0.0.0.0:25", &format!("127.0.0.1:{port}"))
                .replace("0.0.0.0:587", &format!("127.0.0.1:{submission_port}"))
                .replace("/etc/mailwarden/mx.crt", &cert.display().to_string())
                .replace("/etc/mailwarden/mx.key", &key.display().to_string())
                .replace("127.0.0.1:10025", &format!("127.0.0.1:{inbound_hop}"))
                .replace("127.0.0.1:10587", &format!("127.0.0.1:{submission_hop}"))
                .replace("example.org", DOMAIN);
            format!(
                "{text}\n[dns]\nnameservers = [\"127.0.0.1:{dns_port}\"]\ntimeout_ms = 2000\n\
                 attempts = 1\n\n[shutdown]\ngrace_period = \"2s\"\n\n[log]\nlevel = \"debug\"\n"
            )
        });
        mw.submission_port = submission_port;
        mw
    }

    /// Starts `mailwarden run` on the config `render(port, dns_port)` writes.
    fn start_with(dir: &Path, render: impl Fn(u16, u16) -> String) -> Mailwarden {
        fs::create_dir_all(dir).unwrap();
        let mut last_error = String::new();
        for attempt in 0..3 {
            let port = free_port();
            let dns = StubDns::start();
            let dns_port = dns.port;
            let config = dir.join(format!("mailwarden{attempt}.toml"));
            fs::write(&config, render(port, dns_port)).unwrap();
            let stderr_path = dir.join(format!("mailwarden{attempt}.stderr"));
            let stderr = fs::File::create(&stderr_path).unwrap();
            let child = Command::new(env!("CARGO_BIN_EXE_mailwarden"))
                .arg("run")
                .arg("--config")
                .arg(&config)
                .stdin(Stdio::null())
                .stdout(Stdio::null())
                .stderr(stderr)
                .spawn()
                .expect("spawn the mailwarden binary");
            let mut mw = Mailwarden {
                child,
                port,
                submission_port: 0,
                config,
                stderr_path,
                _dns: dns,
            };
            let mut exited = None;
            let up = wait_until(Duration::from_secs(20), || {
                if let Ok(Some(status)) = mw.child.try_wait() {
                    exited = Some(status);
                    return true;
                }
                TcpStream::connect(("127.0.0.1", port)).is_ok()
            });
            match (up, exited) {
                (true, None) => return mw,
                (_, Some(status)) => {
                    last_error = format!("mailwarden exited with {status}; stderr:\n{}", mw.log())
                }
                (false, None) => {
                    last_error = format!(
                        "mailwarden did not listen on 127.0.0.1:{port} within 20s; stderr:\n{}",
                        mw.log()
                    )
                }
            }
        }
        panic!("could not start mailwarden: {last_error}");
    }

    fn log(&self) -> String {
        fs::read_to_string(&self.stderr_path).unwrap_or_default()
    }
}

impl Drop for Mailwarden {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

// ---------------------------------------------------------------------------
// minimal SMTP client

struct Reply {
    code: u16,
    lines: Vec<String>,
}

impl Reply {
    fn text(&self) -> String {
        self.lines.join("\n")
    }
}

struct Client {
    writer: TcpStream,
    reader: BufReader<TcpStream>,
    transcript: String,
}

impl Client {
    /// Connects to 127.0.0.1:port from `source` (port chosen by the kernel).
    fn connect_from(source: Ipv4Addr, port: u16) -> Client {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        let stream = rt
            .block_on(async {
                let socket = tokio::net::TcpSocket::new_v4()?;
                socket.bind(SocketAddr::from((source, 0)))?;
                let target = SocketAddr::from((Ipv4Addr::LOCALHOST, port));
                tokio::time::timeout(IO_TIMEOUT, socket.connect(target))
                    .await
                    .map_err(|_| std::io::Error::other("connect timed out"))?
            })
            .unwrap_or_else(|e| panic!("connect {source} -> 127.0.0.1:{port}: {e}"));
        let stream = stream.into_std().unwrap();
        stream.set_nonblocking(false).unwrap();
        assert_eq!(stream.local_addr().unwrap().ip(), source);
        stream.set_nodelay(true).unwrap();
        stream.set_read_timeout(Some(IO_TIMEOUT)).unwrap();
        stream.set_write_timeout(Some(IO_TIMEOUT)).unwrap();
        Client {
            reader: BufReader::new(stream.try_clone().unwrap()),
            writer: stream,
            transcript: String::new(),
        }
    }

    fn read_reply(&mut self) -> Reply {
        let mut lines = Vec::new();
        loop {
            let mut raw = Vec::new();
            let n = (&mut self.reader)
                .take(100_000)
                .read_until(b'\n', &mut raw)
                .unwrap_or_else(|e| panic!("reading reply: {e}\ntranscript:\n{}", self.transcript));
            assert!(
                n > 0,
                "connection closed while waiting for a reply\ntranscript:\n{}",
                self.transcript
            );
            let line = String::from_utf8_lossy(&raw)
                .trim_end_matches(['\r', '\n'])
                .to_string();
            writeln!(self.transcript, "S: {line}").unwrap();
            assert!(
                line.len() >= 3 && line.as_bytes()[..3].iter().all(u8::is_ascii_digit),
                "malformed reply line {line:?}\ntranscript:\n{}",
                self.transcript
            );
            let last = line.as_bytes().get(3) != Some(&b'-');
            lines.push(line);
            if last {
                break;
            }
        }
        let code = lines[0][..3].parse().unwrap();
        Reply { code, lines }
    }

    fn send_raw(&mut self, bytes: &[u8]) {
        self.writer
            .write_all(bytes)
            .unwrap_or_else(|e| panic!("write: {e}\ntranscript:\n{}", self.transcript));
    }

    fn cmd(&mut self, line: &str) -> Reply {
        writeln!(self.transcript, "C: {line}").unwrap();
        self.send_raw(format!("{line}\r\n").as_bytes());
        self.read_reply()
    }

    fn expect(&mut self, line: &str, code: u16) -> Reply {
        let reply = self.cmd(line);
        assert_eq!(
            reply.code,
            code,
            "unexpected reply to {line:?}: {}\ntranscript:\n{}",
            reply.text(),
            self.transcript
        );
        reply
    }

    /// Sends `message` (CRLF lines, not dot-stuffed) after a 354, dot-stuffing it.
    fn data(&mut self, message: &[u8]) -> Reply {
        self.expect("DATA", 354);
        let mut wire = Vec::with_capacity(message.len() + 1024);
        for line in message.split_inclusive(|b| *b == b'\n') {
            if line.first() == Some(&b'.') {
                wire.push(b'.');
            }
            wire.extend_from_slice(line);
        }
        assert!(wire.ends_with(b"\r\n"));
        wire.extend_from_slice(b".\r\n");
        writeln!(
            self.transcript,
            "C: <{} octets of message data>",
            wire.len()
        )
        .unwrap();
        self.send_raw(&wire);
        self.read_reply()
    }
}

// ---------------------------------------------------------------------------
// message construction and comparison

fn build_message(token: &str, to: &str) -> Vec<u8> {
    let mut m = String::new();
    let mut line = |s: &str| {
        m.push_str(s);
        m.push_str("\r\n");
    };
    line("Date: Thu, 01 Jan 2026 00:00:00 +0000");
    line("From: Sender <sender@example.org>");
    line(&format!("To: {to}"));
    line(&format!("Subject: mailwarden postfix e2e {token}"));
    line(&format!("Message-ID: <{token}@example.org>"));
    line("MIME-Version: 1.0");
    line("Content-Type: text/plain; charset=utf-8");
    line("Content-Transfer-Encoding: 8bit");
    line("X-Folded: first part");
    line(" second part");
    line("\tthird part");
    line("X-Empty-Looking:    ");
    line("");
    line("Hello through mailwarden and Postfix.");
    line(".leading dot");
    line("..two leading dots");
    line(".");
    line(" .");
    line(". ");
    line("..");
    line("8-bit: gr\u{fc}\u{df}e, \u{65e5}\u{672c}\u{8a9e}, \u{1f4ec}");
    line("trailing spaces   ");
    line("tab\there");
    line("");
    line("");
    line("From the start of a line (mbox-style escaping must not happen)");
    line(&"x".repeat(990));
    for i in 0..2000 {
        line(&format!(
            "line {i:05} {} {}",
            "abcdefghijklmnopqrstuvwxyz".repeat(1 + i % 3),
            if i % 7 == 0 { "." } else { "" }
        ));
        if i % 97 == 0 {
            line(".");
        }
    }
    line("last line");
    m.into_bytes()
}

/// What a Maildir file must contain after the trace headers: the sent message
/// with CRLF turned into LF (Postfix stores Unix line ends).
fn crlf_to_lf(message: &[u8]) -> Vec<u8> {
    let text = std::str::from_utf8(message).unwrap();
    text.replace("\r\n", "\n").into_bytes()
}

/// Header fields added on top of the message on its way: Postfix's trace
/// fields and mailwarden's Authentication-Results (RFC 8601: prepended like a
/// trace field).
const TRACE_HEADERS: [&str; 5] = [
    "return-path",
    "delivered-to",
    "received",
    "x-original-to",
    "authentication-results",
];

/// Splits the leading trace header fields (with their continuation lines) off a
/// delivered message. Returns (trace fields unfolded, rest).
fn split_trace(delivered: &[u8]) -> (Vec<String>, &[u8]) {
    let mut fields: Vec<String> = Vec::new();
    let mut pos = 0;
    while pos < delivered.len() {
        let end = delivered[pos..]
            .iter()
            .position(|b| *b == b'\n')
            .map_or(delivered.len(), |i| pos + i + 1);
        let line = String::from_utf8_lossy(&delivered[pos..end]);
        let line = line.trim_end_matches('\n');
        if line.starts_with([' ', '\t']) && !fields.is_empty() {
            let last = fields.last_mut().unwrap();
            last.push(' ');
            last.push_str(line.trim());
        } else {
            let name = line.split(':').next().unwrap_or("").to_ascii_lowercase();
            if !line.contains(':') || !TRACE_HEADERS.contains(&name.as_str()) {
                break;
            }
            fields.push(line.to_string());
        }
        pos = end;
    }
    (fields, &delivered[pos..])
}

fn first_difference(a: &[u8], b: &[u8]) -> String {
    let i = a.iter().zip(b).take_while(|(x, y)| x == y).count();
    let ctx = |s: &[u8]| {
        let from = i.saturating_sub(80);
        let to = (i + 80).min(s.len());
        String::from_utf8_lossy(&s[from..to]).into_owned()
    };
    format!(
        "lengths {} vs {}, first difference at byte {i}\nexpected around it: {:?}\ndelivered around it: {:?}",
        a.len(),
        b.len(),
        ctx(a),
        ctx(b)
    )
}

/// Waits for exactly `count` files in a Maildir's new/ and returns their contents.
fn wait_for_maildir(dir: &Path, count: usize, pf: &Postfix, mw: &Mailwarden) -> Vec<Vec<u8>> {
    let list = || -> Vec<PathBuf> {
        let mut files: Vec<PathBuf> = fs::read_dir(dir)
            .map(|rd| rd.filter_map(|e| e.ok().map(|e| e.path())).collect())
            .unwrap_or_default();
        files.sort();
        files
    };
    let ok = wait_until(DELIVERY_TIMEOUT, || list().len() >= count);
    assert!(
        ok,
        "expected {count} message(s) in {} within {DELIVERY_TIMEOUT:?}, found {}\n\
         --- postfix maillog ---\n{}\n--- mailwarden stderr ---\n{}",
        dir.display(),
        list().len(),
        pf.log(),
        mw.log()
    );
    let files = list();
    assert_eq!(
        files.len(),
        count,
        "unexpected extra messages in {}",
        dir.display()
    );
    files.iter().map(|f| fs::read(f).unwrap()).collect()
}

/// Checks one delivered copy and returns the Postfix queue id from its Received header.
fn check_delivered(delivered: &[u8], sent: &[u8], rcpt: &str) -> String {
    let (trace, rest) = split_trace(delivered);
    let expected = crlf_to_lf(sent);
    assert!(
        rest == expected.as_slice(),
        "delivered message for {rcpt} differs from what was sent (apart from leading trace headers {trace:?}): {}",
        first_difference(&expected, rest)
    );
    let has = |prefix: &str, value: &str| {
        trace.iter().any(|f| {
            f.to_ascii_lowercase()
                .starts_with(&prefix.to_ascii_lowercase())
                && f.contains(value)
        })
    };
    assert!(
        has("Return-Path:", "<sender@example.org>"),
        "no Return-Path in {trace:?}"
    );
    assert!(
        has("Delivered-To:", rcpt),
        "no Delivered-To: {rcpt} in {trace:?}"
    );
    // mailwarden's own verification result, exactly one, with its authserv-id.
    let auth_results: Vec<&String> = trace
        .iter()
        .filter(|f| {
            f.to_ascii_lowercase()
                .starts_with("authentication-results:")
        })
        .collect();
    assert!(
        auth_results.len() == 1
            && auth_results[0]["authentication-results:".len()..]
                .trim_start()
                .starts_with("mailwarden.test;"),
        "want exactly one `Authentication-Results: mailwarden.test; ...` on top, got {auth_results:?}"
    );
    let postfix_received = trace
        .iter()
        .find(|f| {
            f.to_ascii_lowercase().starts_with("received:")
                && f.contains(&format!("by {POSTFIX_HOSTNAME} (Postfix)"))
        })
        .unwrap_or_else(|| panic!("no Received header from Postfix in {trace:?}"));
    assert!(
        postfix_received.contains("[127.0.0.2]") && !postfix_received.contains("[127.0.0.1]"),
        "Postfix's Received header does not name the original client [127.0.0.2]: {postfix_received}"
    );
    // XCLIENT HELO plus a re-EHLO with the client's own name: Postfix records the
    // client's HELO, not mailwarden's.
    assert!(
        postfix_received.contains("from client.example.org"),
        "Postfix's Received header does not carry the client's HELO name: {postfix_received}"
    );
    let queue_id = postfix_received
        .split_whitespace()
        .skip_while(|w| *w != "id")
        .nth(1)
        .map(|w| w.trim_end_matches(';').to_string())
        .unwrap_or_else(|| panic!("no queue id in {postfix_received}"));
    assert!(!queue_id.is_empty());
    queue_id
}

/// Postfix's smtpd logs `QUEUEID: client=NAME[ADDR]` once per message.
fn check_log_client(pf: &Postfix, queue_id: &str, mw: &Mailwarden) {
    let needle = format!("{queue_id}: client=");
    let mut line = String::new();
    let found = wait_until(Duration::from_secs(20), || {
        match pf.log().lines().find(|l| l.contains(&needle)) {
            Some(l) => {
                line = l.to_string();
                true
            }
            None => false,
        }
    });
    assert!(
        found,
        "no `{needle}` line in Postfix's log\n--- postfix maillog ---\n{}\n--- mailwarden stderr ---\n{}",
        pf.log(),
        mw.log()
    );
    let client = line.split(&needle).nth(1).unwrap_or("");
    let client = client.split([',', ' ']).next().unwrap_or("");
    assert!(
        client.ends_with("[127.0.0.2]"),
        "Postfix logged client {client:?} for {queue_id}, expected the original client [127.0.0.2] \
         (XCLIENT not applied?): {line}"
    );
    let delivered = format!("{queue_id}: to=<");
    assert!(
        wait_until(Duration::from_secs(20), || pf
            .log()
            .lines()
            .any(|l| l.contains(&delivered) && l.contains("status=sent"))),
        "no `status=sent` line for {queue_id} in Postfix's log:\n{}",
        pf.log()
    );
}

fn tempdir() -> tempfile::TempDir {
    // Keep paths short: Postfix's UNIX sockets live under queue_directory and
    // sun_path is limited to 108 bytes.
    let base = std::env::temp_dir();
    let base = if base.as_os_str().len() > 40 {
        PathBuf::from("/tmp")
    } else {
        base
    };
    let dir = tempfile::Builder::new()
        .prefix("mw-postfix-e2e-")
        .tempdir_in(base)
        .expect("create tempdir");
    fs::set_permissions(dir.path(), fs::Permissions::from_mode(0o755)).unwrap();
    dir
}

// ---------------------------------------------------------------------------
// the test

#[test]
fn relays_through_postfix_with_xclient_and_delivers_byte_exact() {
    let dir = tempdir();
    let pf = Postfix::start(dir.path(), &["rcpt", "other"], "127.0.0.0/8");
    let mw = Mailwarden::start(&dir.path().join("mailwarden"), pf.port);

    let token = format!(
        "{}.{}",
        std::process::id(),
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_nanos()
    );
    let first = build_message(
        &format!("{token}.1"),
        "Recipient <rcpt@example.test>, other@example.test",
    );
    let second = build_message(&format!("{token}.2"), "rcpt@example.test");

    let mut c = Client::connect_from(CLIENT_IP, mw.port);
    let greeting = c.read_reply();
    assert_eq!(greeting.code, 220, "greeting: {}", greeting.text());
    c.expect("EHLO client.example.org", 250);

    // Transaction 1: two recipients, 8-bit body.
    c.expect(
        &format!(
            "MAIL FROM:<sender@example.org> BODY=8BITMIME SIZE={}",
            first.len()
        ),
        250,
    );
    c.expect("RCPT TO:<rcpt@example.test>", 250);
    c.expect("RCPT TO:<other@example.test>", 250);
    let reply = c.data(&first);
    assert_eq!(
        reply.code,
        250,
        "end of DATA (1): {}\ntranscript:\n{}\n--- postfix maillog ---\n{}\n--- mailwarden stderr ---\n{}",
        reply.text(),
        c.transcript,
        pf.log(),
        mw.log()
    );

    // Transaction 2 in the same session.
    c.expect("MAIL FROM:<sender@example.org> BODY=8BITMIME", 250);
    c.expect("RCPT TO:<rcpt@example.test>", 250);
    let reply = c.data(&second);
    assert_eq!(
        reply.code,
        250,
        "end of DATA (2): {}\ntranscript:\n{}\n--- postfix maillog ---\n{}\n--- mailwarden stderr ---\n{}",
        reply.text(),
        c.transcript,
        pf.log(),
        mw.log()
    );
    c.expect("QUIT", 221);

    // rcpt@ gets both messages, other@ only the first.
    let rcpt_files = wait_for_maildir(&pf.maildir_new("rcpt"), 2, &pf, &mw);
    let other_files = wait_for_maildir(&pf.maildir_new("other"), 1, &pf, &mw);

    let subject_of = |m: &[u8], tok: &str| {
        let needle = format!("Subject: mailwarden postfix e2e {tok}\n");
        m.windows(needle.len()).any(|w| w == needle.as_bytes())
    };
    let rcpt_first = rcpt_files
        .iter()
        .find(|m| subject_of(m, &format!("{token}.1")))
        .expect("rcpt@ did not get message 1");
    let rcpt_second = rcpt_files
        .iter()
        .find(|m| subject_of(m, &format!("{token}.2")))
        .expect("rcpt@ did not get message 2");

    let id1 = check_delivered(rcpt_first, &first, "rcpt@example.test");
    let id1_other = check_delivered(&other_files[0], &first, "other@example.test");
    assert_eq!(
        id1, id1_other,
        "both copies of message 1 come from one Postfix queue file"
    );
    let id2 = check_delivered(rcpt_second, &second, "rcpt@example.test");
    assert_ne!(id1, id2);

    check_log_client(&pf, &id1, &mw);
    check_log_client(&pf, &id2, &mw);

    // Postfix saw the proxy's connection(s) from 127.0.0.1, never a direct one
    // from 127.0.0.2 (the client only talked to mailwarden).
    let log = pf.log();
    assert!(
        !log.lines().any(|l| l.contains("connect from")
            && l.contains("[127.0.0.2]")
            && !l.contains("disconnect")),
        "Postfix saw a direct connection from 127.0.0.2?\n{log}"
    );

    // Postfix offers CHUNKING (3.4 and later), so the messages went as BDAT: its
    // `disconnect from` line counts the commands once the proxy's connection closes.
    drop(mw);
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(15);
    let counted = |log: &str| {
        log.lines()
            .any(|l| l.contains("disconnect from") && l.contains(" bdat=2"))
    };
    while !counted(&pf.log()) && std::time::Instant::now() < deadline {
        std::thread::sleep(std::time::Duration::from_millis(100));
    }
    let log = pf.log();
    assert!(
        counted(&log) && !log.lines().any(|l| l.contains(" data=")),
        "the proxy should send both messages with BDAT to a Postfix that offers CHUNKING\n{log}"
    );
    drop(pf);
}

/// With `xclient = "require"`, a Postfix that does not authorize the proxy for
/// XCLIENT (and so does not offer it) must never receive the message: the
/// client gets 451 4.3.0 at RCPT and nothing is queued.
#[test]
fn xclient_require_refuses_postfix_without_xclient_authorization() {
    let dir = tempdir();
    let pf = Postfix::start(dir.path(), &["rcpt"], "");
    let mw = Mailwarden::start(&dir.path().join("mailwarden"), pf.port);

    let mut c = Client::connect_from(CLIENT_IP, mw.port);
    assert_eq!(c.read_reply().code, 220);
    c.expect("EHLO client.example.org", 250);
    c.expect("MAIL FROM:<sender@example.org>", 250);
    let reply = c.cmd("RCPT TO:<rcpt@example.test>");
    assert!(
        reply.code == 451 && reply.lines[0].starts_with("451 4.3.0"),
        "RCPT through a next hop without XCLIENT: want 451 4.3.0, got {}\ntranscript:\n{}\n\
         --- postfix maillog ---\n{}\n--- mailwarden stderr ---\n{}",
        reply.text(),
        c.transcript,
        pf.log(),
        mw.log()
    );
    // The session stays usable.
    c.expect("RSET", 250);
    c.expect("QUIT", 221);

    // Nothing was queued or delivered by Postfix.
    std::thread::sleep(Duration::from_secs(1));
    let log = pf.log();
    assert!(
        !log.contains(": client="),
        "Postfix queued a message although XCLIENT was not available:\n{log}"
    );
    let delivered = fs::read_dir(pf.maildir_new("rcpt"))
        .map(|rd| rd.count())
        .unwrap_or(0);
    assert_eq!(delivered, 0, "a message was delivered:\n{log}");
}

// ---------------------------------------------------------------------------
// the README recipe: both roles, SASL

/// An async test client (STARTTLS, AUTH) connected from `source` to 127.0.0.1:`port`.
async fn session_from(source: Ipv4Addr, port: u16) -> common::smtp_client::Client {
    let sock = tokio::net::TcpSocket::new_v4().expect("socket");
    sock.bind(SocketAddr::from((source, 0)))
        .expect("bind source");
    let tcp = tokio::time::timeout(
        IO_TIMEOUT,
        sock.connect(SocketAddr::from(([127, 0, 0, 1], port))),
    )
    .await
    .expect("connect timed out")
    .expect("connect");
    let mut c = common::smtp_client::Client::from_tcp(tcp);
    assert_eq!(c.read_reply().await.code, 220);
    c
}

fn sasl_user() -> String {
    format!("{SASL_LOCAL}@{DOMAIN}")
}

fn auth_plain(user: &str, password: &str) -> String {
    use base64::Engine;
    let blob = format!("\0{user}\0{password}");
    format!(
        "AUTH PLAIN {}",
        base64::engine::general_purpose::STANDARD.encode(blob)
    )
}

/// EHLO, STARTTLS, EHLO, AUTH PLAIN at mailwarden's submission listener; the AUTH reply.
async fn login(
    port: u16,
    password: &str,
) -> (common::smtp_client::Client, common::smtp_client::Reply) {
    let mut c = session_from(CLIENT_IP, port).await;
    c.ehlo("laptop.example.test").await;
    c.starttls().await;
    let e = c.ehlo("laptop.example.test").await;
    assert!(e.has_ext("AUTH"), "AUTH not offered after STARTTLS: {e:?}");
    let r = c.cmd(&auth_plain(&sasl_user(), password)).await;
    (c, r)
}

fn short_message(from: &str, to: &str, token: &str) -> Vec<u8> {
    format!(
        "From: {from}\r\nTo: {to}\r\nSubject: {token}\r\nMessage-ID: <{token}@example.test>\r\n\r\n{token}\r\n"
    )
    .into_bytes()
}

/// `mailwarden ARGS` (a CLI command against the running proxy's config), bounded.
async fn mailwarden_cli(dir: &Path, args: &[&str]) -> common::Finished {
    let mut command = Command::new(env!("CARGO_BIN_EXE_mailwarden"));
    command.args(args).current_dir(dir).env("USER", "e2e-admin");
    common::run_bounded(command, dir, Duration::from_secs(60)).await
}

/// Postfix's delivery log lines for recipient `rcpt` (one per message it took).
fn log_lines_for(pf: &Postfix, rcpt: &str) -> Vec<String> {
    let needle = format!("to=<{rcpt}>");
    pf.log()
        .lines()
        .filter(|l| l.contains(&needle) && l.contains("status="))
        .map(str::to_string)
        .collect()
}

/// Waits until Postfix logged `count` delivery attempts to `rcpt`.
fn wait_log_lines(pf: &Postfix, rcpt: &str, count: usize, mw: &Mailwarden) -> Vec<String> {
    if !wait_until(DELIVERY_TIMEOUT, || log_lines_for(pf, rcpt).len() >= count) {
        panic!(
            "Postfix never logged {count} deliveries to {rcpt}:\n{}\n--- mailwarden ---\n{}",
            pf.log(),
            mw.log()
        );
    }
    log_lines_for(pf, rcpt)
}

/// The README's recipe for both roles, run as written against a real Postfix with a
/// Cyrus sasldb: inbound delivery with XCLIENT; a submission with AUTH relayed to a
/// remote recipient; a submission without AUTH refused; a frozen account's message
/// released through Postfix to a remote recipient as its user (XCLIENT LOGIN=); and no
/// open relay through mailwarden or around it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn readme_recipe_both_roles_with_sasl() {
    let dir = tempdir();
    let (pf, submission_hop) = Postfix::start_recipe(dir.path(), &["alice", "bob"]);
    let mw = Mailwarden::start_recipe(&dir.path().join("mailwarden"), pf.port, submission_hop);
    let config = mw.config.display().to_string();
    let remote = "friend@remote.example";
    let local = format!("bob@{DOMAIN}");
    let user = sasl_user();

    // Inbound: a local recipient is delivered, Postfix sees the real client.
    let mut c = session_from(CLIENT_IP, mw.port).await;
    c.ehlo("mx.remote.example").await;
    let fin = c
        .send_mail(
            "someone@remote.example",
            &[&local],
            &short_message("someone@remote.example", &local, "inbound-1"),
        )
        .await;
    assert_eq!(fin.code, 250, "inbound: {fin:?}\n{}", mw.log());
    // ... a remote one is refused by mailwarden itself.
    c.expect("MAIL FROM:<someone@remote.example>", "250").await;
    let r = c.cmd(&format!("RCPT TO:<{remote}>")).await;
    assert!(r.is("550 5.7.1"), "inbound to a remote recipient: {r:?}");
    let _ = c.cmd("QUIT").await;
    let lines = wait_log_lines(&pf, &local, 1, &mw);
    assert!(lines[0].contains("status=sent"), "{lines:?}");
    assert!(
        pf.log().contains(&format!("client=unknown[{CLIENT_IP}]")),
        "Postfix did not see the real client:\n{}",
        pf.log()
    );

    // Submission without AUTH: refused by mailwarden, for local and remote recipients.
    let mut c = session_from(CLIENT_IP, mw.submission_port).await;
    c.ehlo("laptop.example.test").await;
    let r = c.cmd(&format!("MAIL FROM:<{user}>")).await;
    assert!(r.is("530 5.7.0"), "submission without AUTH: {r:?}");
    let _ = c.cmd("QUIT").await;

    // A wrong password: Postfix's answer, passed back.
    let (mut c, r) = login(mw.submission_port, "not-the-password").await;
    assert_eq!(r.code, 535, "wrong password: {r:?}\n{}", pf.log());
    let _ = c.cmd("QUIT").await;

    // Submission with AUTH: relayed to a remote recipient (the test instance's default
    // transport discards: Postfix logs it as delivered, nothing leaves the machine).
    let (mut c, r) = login(mw.submission_port, SASL_PASSWORD).await;
    assert_eq!(r.code, 235, "AUTH: {r:?}\n{}\n{}", pf.log(), mw.log());
    let fin = c
        .send_mail(
            &user,
            &[remote],
            &short_message(&user, remote, "submission-1"),
        )
        .await;
    assert_eq!(fin.code, 250, "submission: {fin:?}\n{}", pf.log());
    let _ = c.cmd("QUIT").await;
    let lines = wait_log_lines(&pf, remote, 1, &mw);
    assert!(
        lines[0].contains("discarded by the test instance"),
        "{lines:?}"
    );
    assert!(
        pf.log().contains(&format!("sasl_username={user}")),
        "Postfix did not see the login:\n{}",
        pf.log()
    );

    // Freeze the account through the running proxy: the next message is held.
    let f = mailwarden_cli(
        dir.path(),
        &[
            "accounts", "-c", &config, "freeze", &user, "--reason", "e2e",
        ],
    )
    .await;
    assert!(f.success(), "freeze: {}{}", f.stdout_text(), f.stderr);
    let (mut c, r) = login(mw.submission_port, SASL_PASSWORD).await;
    assert_eq!(r.code, 235);
    let fin = c
        .send_mail(&user, &[remote], &short_message(&user, remote, "frozen-1"))
        .await;
    let id = fin
        .text()
        .strip_prefix("2.0.0 Ok: queued as ")
        .filter(|id| id.len() == 26)
        .unwrap_or_else(|| panic!("not held: {fin:?}"))
        .to_string();
    let _ = c.cmd("QUIT").await;
    std::thread::sleep(Duration::from_millis(500));
    assert_eq!(
        log_lines_for(&pf, remote).len(),
        1,
        "held mail reached Postfix"
    );

    // Released: through the submission smtpd, as the user (XCLIENT LOGIN=), to the
    // remote recipient.
    let r = mailwarden_cli(dir.path(), &["quarantine", "-c", &config, "release", &id]).await;
    assert!(
        r.success(),
        "release: {}{}\n{}",
        r.stdout_text(),
        r.stderr,
        pf.log()
    );
    let lines = wait_log_lines(&pf, remote, 2, &mw);
    assert!(
        lines[1].contains("discarded by the test instance"),
        "{lines:?}"
    );
    assert!(
        pf.log().contains("sasl_method=XCLIENT"),
        "the release was not sent as the user:\n{}",
        pf.log()
    );
    assert!(
        pf.log().contains("postfix/mailwarden-submission"),
        "the release did not go through the submission smtpd:\n{}",
        pf.log()
    );

    // No open relay around mailwarden either: each smtpd, reached directly from a
    // client that is not mailwarden, refuses a remote recipient and XCLIENT.
    for port in [pf.port, submission_hop] {
        let mut c = session_from(CLIENT_IP, port).await;
        c.ehlo("intruder.example").await;
        let x = c.cmd("XCLIENT ADDR=127.0.0.1").await;
        assert_eq!(x.code / 100, 5, "XCLIENT from an outsider on {port}: {x:?}");
        c.expect("MAIL FROM:<intruder@remote.example>", "250").await;
        let r = c.cmd(&format!("RCPT TO:<{remote}>")).await;
        assert_eq!(r.code / 100, 5, "direct relay on {port}: {r:?}");
        let _ = c.cmd("QUIT").await;
    }
    assert_eq!(log_lines_for(&pf, remote).len(), 2, "{}", pf.log());
    drop(mw);
    drop(pf);
}

/// `xclient = "auto"` against a Postfix that does not authorize XCLIENT for mailwarden
/// and trusts its address (the README's old `-o mynetworks=127.0.0.0/8`): every client
/// would look like 127.0.0.1. mailwarden asks first, finds it would relay, and refuses:
/// a 4xx, nothing relayed to a remote recipient, an ERROR in the log.
#[test]
fn xclient_auto_refuses_a_postfix_that_trusts_the_proxy() {
    let dir = tempdir();
    let pf = Postfix::start(dir.path(), &["rcpt"], "");
    let next_hop_port = pf.port;
    let mw = Mailwarden::start_with(&dir.path().join("mailwarden"), |port, dns_port| {
        format!(
            "local_domains = [\"{DOMAIN}\"]\n\
             [[listener]]\naddress = \"127.0.0.1:{port}\"\nrole = \"submission\"\n\
             [next_hop]\naddress = \"smtp://127.0.0.1:{next_hop_port}\"\nxclient = \"auto\"\ntls = \"off\"\n\
             [outbound]\ntrusted_networks = [\"{CLIENT_IP}/32\"]\n\
             [dns]\nnameservers = [\"127.0.0.1:{dns_port}\"]\n"
        )
    });
    let mut c = Client::connect_from(CLIENT_IP, mw.port);
    assert_eq!(c.read_reply().code, 220);
    c.expect("EHLO app.example.test", 250);
    c.expect("MAIL FROM:<app@example.test>", 250);
    let reply = c.cmd("RCPT TO:<friend@remote.example>");
    assert_eq!(
        reply.code / 100,
        4,
        "RCPT through a trusting next hop without XCLIENT: {}\n{}\n{}",
        reply.text(),
        pf.log(),
        mw.log()
    );
    c.expect("QUIT", 221);
    std::thread::sleep(Duration::from_secs(1));
    let log = pf.log();
    assert!(
        !log.contains(": client="),
        "Postfix queued something:\n{log}"
    );
    let mwlog = mw.log();
    assert!(
        mwlog.contains("ERROR") && mwlog.contains("trusts our address"),
        "{mwlog}"
    );
}
