//! The `session` target: a whole SMTP session, command stream in, replies out (issue 7,
//! RELIABILITY B7). Unlike the other targets this one drives the real listener: a
//! `Server` bound on 127.0.0.1:0 once per process, with a built-in Maildir next hop in
//! memory (/dev/shm), STARTTLS offered and sender authentication off (the verification
//! path has its own target, and a session must not wait on DNS).
//!
//! Each input is one connection: the client writes every byte (no waiting for replies,
//! so any pipelining an attacker could try), half-closes, and reads until the proxy hangs
//! up. What must hold:
//! - the proxy hangs up promptly once the client is done (no hang, whatever the state);
//! - the reply stream is well-formed replies only, the first a 220 greeting, and never
//!   more replies than there were command lines (plus the greeting and one parting 421):
//!   an extra reply is a desynchronised session, the symptom of smuggling;
//! - after a STARTTLS go-ahead nothing in plain text follows (pipelined commands are
//!   dropped, CVE-2011-0411), only TLS;
//! - nothing lost, nothing twice: every `250 … stored as NAME` names a distinct message
//!   in the Maildir, every stored message was acknowledged (when the connection closed
//!   cleanly), stored content is canonical CRLF text and nothing is left in `tmp/`.

use std::collections::BTreeSet;
use std::io::{ErrorKind, Read, Write};
use std::net::{Shutdown, SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::sync::{Mutex, OnceLock};
use std::time::Duration;

use tokio_util::sync::CancellationToken;

use crate::config::{Config, Purpose};
use crate::server::Server;

/// How long the proxy may take to hang up after the client has sent everything. Nothing
/// in a session waits once the client is gone (error_sleep is 0 here), so reaching this
/// is a hang.
const HANGUP_WAIT: Duration = Duration::from_secs(20);

/// The text of the Maildir next hop's acknowledgement (`relay::NextHop`).
const STORED_AS: &str = "250 2.0.0 Ok: stored as ";

struct Harness {
    addr: SocketAddr,
    maildir: PathBuf,
    /// One session at a time: the Maildir is checked as a whole after each.
    lock: Mutex<()>,
}

/// Client bytes as one SMTP session against the real listener.
pub fn session(data: &[u8]) {
    let harness = harness();
    let _one_at_a_time = harness.lock.lock().unwrap_or_else(|e| e.into_inner());
    // Also done after each input; here too in case the previous one panicked early.
    clear(&harness.maildir);
    let run = converse(harness.addr, data);
    let outcome = std::panic::catch_unwind(|| check(&run, data, &harness.maildir));
    clear(&harness.maildir);
    if let Err(panic) = outcome {
        std::panic::resume_unwind(panic);
    }
}

/// What came back over one connection.
struct Conversation {
    replies: Vec<u8>,
    /// The proxy reset the connection (it hung up with client bytes unread) rather than
    /// closing it: the last replies may be lost in flight.
    reset: bool,
}

fn converse(addr: SocketAddr, data: &[u8]) -> Conversation {
    let stream = TcpStream::connect(addr).expect("connect to the fuzzed listener");
    stream
        .set_read_timeout(Some(HANGUP_WAIT))
        .expect("read timeout");
    let mut writer = stream.try_clone().expect("clone the client socket");
    let mut reader = stream;
    std::thread::scope(|scope| {
        // Written from a thread of its own: the proxy may stop reading (421) while
        // replies are still owed, and a blocked write must not stop the read.
        let writing = scope.spawn(move || {
            let sent = writer.write_all(data).and_then(|()| writer.flush());
            let _ = writer.shutdown(Shutdown::Write);
            sent.is_err()
        });
        let mut replies = Vec::new();
        let mut buf = [0u8; 16 * 1024];
        let mut reset = false;
        loop {
            match reader.read(&mut buf) {
                Ok(0) => break,
                Ok(n) => replies.extend_from_slice(&buf[..n]),
                Err(e) if matches!(e.kind(), ErrorKind::ConnectionReset) => {
                    reset = true;
                    break;
                }
                Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => {
                    panic!(
                        "the proxy did not hang up within {HANGUP_WAIT:?} of the client \
                         finishing; replies so far: {:?}",
                        String::from_utf8_lossy(&replies)
                    )
                }
                Err(e) => panic!("reading replies: {e}"),
            }
        }
        let write_failed = writing.join().expect("writer thread");
        Conversation {
            replies,
            reset: reset || write_failed,
        }
    })
}

fn check(run: &Conversation, data: &[u8], maildir: &Path) {
    let (replies, after_starttls) = split_replies(&run.replies, run.reset);
    assert!(
        replies.first().is_some_and(|r| r.starts_with(b"220 ")),
        "no 220 greeting: {:?}",
        String::from_utf8_lossy(&run.replies)
    );
    for reply in &replies {
        super::assert_wellformed_reply(reply);
    }
    let lines = data.split_inclusive(|&b| b == b'\n').count();
    assert!(
        replies.len() <= lines + 2,
        "{} replies to {lines} lines: the session is out of step",
        replies.len()
    );
    if let Some(tls) = after_starttls {
        // A TLS record (content type 20..=23, version 3.x): an alert for plain text, or
        // a ServerHello if the input happened to carry a ClientHello.
        assert!(
            tls.is_empty() || (matches!(tls[0], 0x14..=0x17) && tls.get(1).is_none_or(|&v| v == 3)),
            "plain text after the STARTTLS go-ahead: {:?}",
            String::from_utf8_lossy(tls)
        );
    }
    check_maildir(&replies, maildir, run.reset);
}

/// The reply stream cut into replies. Returns what follows a STARTTLS go-ahead (a 220
/// after the greeting) separately: from there on the bytes are TLS. A trailing fragment
/// without CRLF is a cut-off reply, tolerated only after a reset.
fn split_replies(stream: &[u8], reset: bool) -> (Vec<&[u8]>, Option<&[u8]>) {
    let mut replies = Vec::new();
    let mut start = 0;
    let mut pos = 0;
    while let Some(len) = stream[pos..].windows(2).position(|w| w == b"\r\n") {
        let line = &stream[pos..pos + len];
        pos += len + 2;
        if line.get(3) == Some(&b'-') {
            continue;
        }
        let reply = &stream[start..pos];
        start = pos;
        let go_ahead = !replies.is_empty() && reply.starts_with(b"220");
        replies.push(reply);
        if go_ahead {
            return (replies, Some(&stream[pos..]));
        }
    }
    assert!(
        start == stream.len() || reset,
        "a reply is cut off at a clean close: {:?}",
        String::from_utf8_lossy(&stream[start..])
    );
    (replies, None)
}

/// Every acknowledged message is stored once; without a reset every stored message was
/// acknowledged; stored content is canonical; no delivery is left half done in `tmp/`.
fn check_maildir(replies: &[&[u8]], maildir: &Path, reset: bool) {
    let mut acknowledged = BTreeSet::new();
    for reply in replies {
        let text = String::from_utf8_lossy(reply);
        if let Some(name) = text.strip_prefix(STORED_AS) {
            let name = name.trim_end().to_string();
            assert!(
                acknowledged.insert(name.clone()),
                "{name} acknowledged twice"
            );
        }
    }
    let stored = file_names(&maildir.join("new"));
    for name in &acknowledged {
        assert!(
            stored.contains(name),
            "acknowledged {name} is not in the Maildir"
        );
    }
    if !reset {
        assert_eq!(
            stored, acknowledged,
            "messages stored without a 250 to the client"
        );
    }
    for name in &stored {
        let content = std::fs::read(maildir.join("new").join(name)).expect("read message");
        super::assert_canonical(&content, "a stored message");
    }
    let half_done = file_names(&maildir.join("tmp"));
    assert!(half_done.is_empty(), "left in tmp/: {half_done:?}");
}

fn file_names(dir: &Path) -> BTreeSet<String> {
    std::fs::read_dir(dir)
        .unwrap_or_else(|e| panic!("{}: {e}", dir.display()))
        .map(|e| {
            e.expect("directory entry")
                .file_name()
                .to_string_lossy()
                .into_owned()
        })
        .collect()
}

/// Empties the Maildir for the next input.
fn clear(maildir: &Path) {
    for sub in ["new", "tmp"] {
        for name in file_names(&maildir.join(sub)) {
            let _ = std::fs::remove_file(maildir.join(sub).join(name));
        }
    }
}

/// The listener, started on first use and kept for the life of the process (a fuzzer
/// runs millions of inputs; one bind each would exhaust ports).
fn harness() -> &'static Harness {
    static HARNESS: OnceLock<Harness> = OnceLock::new();
    HARNESS.get_or_init(start)
}

fn start() -> Harness {
    let base = if Path::new("/dev/shm").is_dir() {
        PathBuf::from("/dev/shm")
    } else {
        std::env::temp_dir()
    };
    remove_stale_maildirs(&base);
    let maildir = base.join(format!("{MAILDIR_PREFIX}{}", std::process::id()));
    let config = Config::parse_for(
        &config_text(&maildir),
        Path::new("fuzz-session.toml"),
        Purpose::Run,
    )
    .expect("the session fuzz config is valid");
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::Builder::new()
        .name("fuzz-session-server".into())
        .spawn(move || {
            let runtime = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .expect("tokio runtime");
            runtime.block_on(async move {
                let server = Server::bind(config, CancellationToken::new())
                    .await
                    .expect("bind the session fuzz listener");
                tx.send(server.local_addrs()[0])
                    .expect("report the address");
                server.run().await;
            });
        })
        .expect("spawn the server thread");
    let addr = rx.recv().expect("the server started");
    Harness {
        addr,
        maildir,
        lock: Mutex::new(()),
    }
}

/// Maildirs are named after the process that made them (fuzz workers and test threads
/// run at once); those of processes that are gone are removed.
const MAILDIR_PREFIX: &str = "mailwarden-fuzz-session-";

fn remove_stale_maildirs(base: &Path) {
    let Ok(entries) = std::fs::read_dir(base) else {
        return;
    };
    for entry in entries.flatten() {
        let name = entry.file_name().to_string_lossy().into_owned();
        let pid = name.strip_prefix(MAILDIR_PREFIX);
        if pid.is_some_and(|pid| !Path::new("/proc").join(pid).exists()) {
            let _ = std::fs::remove_dir_all(entry.path());
        }
    }
}

/// The proxy as shipped, but: port 0, a Maildir next hop, the test certificate for
/// STARTTLS, no authentication checks, no error sleep (a fuzzer cannot wait a second per
/// bad command) and short timeouts (none should be reached: the client always hangs up).
fn config_text(maildir: &Path) -> String {
    let certs = Path::new(env!("CARGO_MANIFEST_DIR")).join("certs");
    format!(
        r#"hostname = "mx.fuzz.example"
local_domains = ["example.org"]

[[listener]]
address = "127.0.0.1:0"
tls_cert = "{cert}"
tls_key = "{key}"

[limits]
message_size_limit = 65536
error_sleep = "0s"
command_timeout = "10s"
data_timeout = "10s"

[next_hop]
address = "maildir:{maildir}"

[auth]
enabled = false
"#,
        cert = certs.join("test-server.crt").display(),
        key = certs.join("test-server.key").display(),
        maildir = maildir.display(),
    )
}
