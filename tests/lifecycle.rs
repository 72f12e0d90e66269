//! Process lifecycle and capacity: graceful shutdown (F8), maildir next hop, session caps,
//! and the check-config / make-cert subcommands.

mod common;

use std::process::Command;
use std::time::{Duration, Instant};

use common::fake_mta::Script;
use common::smtp_client::{Client, assert_reply, dot_stuff_and_terminate, simple_message};
use common::{Proxy, ProxyOptions, bin, bounded, setup_with, show};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn graceful_shutdown_finishes_in_flight_transaction() {
    bounded(async {
        let (mta, mut proxy) = setup_with(Script::default(), |mut o| {
            o.grace_period = "30s".into();
            o
        })
        .await;

        // Session 1: transaction in flight (content sent, final dot not yet).
        let mut busy = proxy.connect_ehlo("busy.example").await;
        busy.expect("MAIL FROM:<a@x.example>", "250 2.1.0").await;
        busy.expect("RCPT TO:<b@y.example>", "250").await;
        busy.expect("DATA", "354").await;
        let body = simple_message(
            "a@x.example",
            "b@y.example",
            "in-flight",
            "first half\r\nsecond half",
        );
        let wire = dot_stuff_and_terminate(&body);
        let split = body.len() / 2;
        busy.send_raw(&wire[..split]).await;

        // Session 2: idle.
        let mut idle = proxy.connect_ehlo("idle.example").await;
        idle.expect("NOOP", "250 2.0.0").await;

        proxy.sigterm();

        // The idle session is told to go away.
        let r = idle.read_reply().await;
        assert_reply(&r, "421 4.3.0", "idle session on SIGTERM");
        idle.expect_eof().await;

        // New connections are refused (the listener is closed).
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            match Client::try_connect(proxy.addr).await {
                Err(_) => break,
                Ok(c) => drop(c),
            }
            assert!(
                Instant::now() < deadline,
                "listener still accepting after SIGTERM"
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }

        // The in-flight transaction completes and is relayed.
        busy.send_raw(&wire[split..]).await;
        let fin = busy.read_reply().await;
        assert_eq!(
            fin.code, 250,
            "in-flight transaction during shutdown: {fin:?}"
        );
        let msgs = mta.accepted();
        assert_eq!(msgs.len(), 1);
        assert!(msgs[0].data.ends_with(&body), "{:?}", msgs[0].data_str());

        // Then the session is closed with 421 (sent unsolicited or as the NOOP answer).
        let _ = busy.try_send_raw(b"NOOP\r\n").await;
        match busy.try_read_reply().await {
            Some(r) => assert_reply(&r, "421 4.3.0", "after the in-flight transaction"),
            None => panic!("session closed without 421 after the in-flight transaction"),
        }

        let status = proxy.wait_exit(Duration::from_secs(60)).await;
        assert!(
            status.success(),
            "exit status {status}; stderr:\n{}",
            proxy.log()
        );
    })
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_idle_proxy_exits_zero() {
    bounded(async {
        let (_mta, mut proxy) = setup_with(Script::default(), |o| o).await;
        proxy.sigterm();
        let status = proxy.wait_exit(Duration::from_secs(60)).await;
        assert!(
            status.success(),
            "exit status {status}; stderr:\n{}",
            proxy.log()
        );
    })
    .await
}

fn files_in(dir: &std::path::Path) -> Vec<std::path::PathBuf> {
    match std::fs::read_dir(dir) {
        Ok(rd) => rd.filter_map(|e| e.ok()).map(|e| e.path()).collect(),
        Err(_) => vec![],
    }
}

fn lf(b: &[u8]) -> String {
    show(b).replace("\r\n", "\n")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn maildir_next_hop_stores_message() {
    bounded(async {
        let dir = tempfile::tempdir().unwrap();
        let maildir = dir.path().join("maildir");
        let opts = ProxyOptions::new(format!("maildir:{}", maildir.display()));
        let proxy = Proxy::start_in(opts, dir).await;
        let mut c = proxy.connect_ehlo("client.example").await;
        let body = simple_message(
            "alice@x.example",
            "bob@y.example",
            "maildir-1",
            "Hello maildir.\r\n.a line starting with a dot\r\n..two dots\r\nend",
        );
        let fin = c
            .send_mail("alice@x.example", &["bob@y.example"], &body)
            .await;
        assert_eq!(fin.code, 250, "{fin:?}");
        // 250 means the file is already in new/ (fsync + rename before the reply).
        let files = files_in(&maildir.join("new"));
        assert_eq!(files.len(), 1, "new/ must hold exactly one file: {files:?}");
        assert!(files_in(&maildir.join("tmp")).is_empty(), "tmp/ not empty");
        let content = std::fs::read(&files[0]).unwrap();
        let text = lf(&content);
        assert!(
            text.starts_with("Return-Path: <alice@x.example>\n"),
            "Return-Path must come first: {text:?}"
        );
        let received = text
            .find("\nReceived:")
            .expect("Received: header prepended");
        let original = text
            .find("From: <alice@x.example>")
            .expect("original headers kept");
        assert!(
            received < original,
            "Received: must precede the original headers"
        );
        assert!(
            text.ends_with(&lf(&body)),
            "body not intact (dot-unstuffed) in maildir file: {text:?}"
        );

        // A second message (null sender) is a second, distinct file.
        let body2 = simple_message("", "bob@y.example", "maildir-2", "bounce");
        let fin2 = c.send_mail("", &["bob@y.example"], &body2).await;
        assert_eq!(fin2.code, 250, "{fin2:?}");
        let files = files_in(&maildir.join("new"));
        assert_eq!(files.len(), 2, "{files:?}");
        let second = files
            .iter()
            .map(|p| lf(&std::fs::read(p).unwrap()))
            .find(|t| t.contains("maildir-2"))
            .expect("second message file");
        assert!(second.starts_with("Return-Path: <>\n"), "{second:?}");
        assert!(second.ends_with(&lf(&body2)));
    })
    .await
}

async fn read_greeting(c: &mut Client) -> common::smtp_client::Reply {
    c.read_reply().await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn session_cap_third_connection_gets_421() {
    bounded(async {
        let (_mta, proxy) = setup_with(Script::default(), |mut o| {
            o.max_sessions = Some(2);
            o
        })
        .await;
        let mut c1 = proxy.connect().await;
        assert_eq!(read_greeting(&mut c1).await.code, 220);
        let mut c2 = proxy.connect().await;
        assert_eq!(read_greeting(&mut c2).await.code, 220);
        let mut c3 = proxy.connect().await;
        let r = read_greeting(&mut c3).await;
        assert_reply(&r, "421 4.3.2", "third session over max_sessions = 2");
        c3.expect_eof().await;
        // The first two are unaffected.
        c1.expect("NOOP", "250 2.0.0").await;
        c2.expect("NOOP", "250 2.0.0").await;
        // After one leaves, a new session is served again.
        c1.expect("QUIT", "221 2.0.0").await;
        c1.expect_eof().await;
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            let mut c = proxy.connect().await;
            let g = read_greeting(&mut c).await;
            if g.code == 220 {
                break;
            }
            assert_reply(&g, "421 4.3.2", "while the slot is being released");
            assert!(Instant::now() < deadline, "session slot never released");
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    })
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn per_client_cap_gets_421_470() {
    bounded(async {
        let (_mta, proxy) = setup_with(Script::default(), |mut o| {
            o.max_sessions_per_client = Some(2);
            o
        })
        .await;
        let mut c1 = proxy.connect().await;
        assert_eq!(read_greeting(&mut c1).await.code, 220);
        let mut c2 = proxy.connect().await;
        assert_eq!(read_greeting(&mut c2).await.code, 220);
        let mut c3 = proxy.connect().await;
        let r = read_greeting(&mut c3).await;
        assert_reply(&r, "421 4.7.0", "third session from the same IP");
        c3.expect_eof().await;
        c1.expect("NOOP", "250 2.0.0").await;
    })
    .await
}

fn write_config(dir: &std::path::Path, text: &str) -> std::path::PathBuf {
    let p = dir.join("check.toml");
    std::fs::write(&p, text).unwrap();
    p
}

#[test]
fn check_config_accepts_valid_and_rejects_invalid() {
    let dir = tempfile::tempdir().unwrap();
    let good = write_config(
        dir.path(),
        "hostname = \"mx.test\"\nlocal_domains = [\"example.com\"]\n\n[[listener]]\naddress = \"127.0.0.1:2525\"\n\n[next_hop]\naddress = \"smtp://127.0.0.1:10025\"\n",
    );
    let out = Command::new(bin())
        .args(["check-config", "--config"])
        .arg(&good)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "valid config rejected: {}{}",
        show(&out.stdout),
        show(&out.stderr)
    );

    // Line 6 holds the bad value.
    let bad_text = "hostname = \"mx.test\"\n\n[[listener]]\naddress = \"127.0.0.1:2525\"\n[limits]\nbare_lf = \"sometimes\"\n";
    let bad = write_config(dir.path(), bad_text);
    let out = Command::new(bin())
        .args(["check-config", "--config"])
        .arg(&bad)
        .output()
        .unwrap();
    assert!(!out.status.success(), "invalid bare_lf accepted");
    let msg = format!("{}{}", show(&out.stdout), show(&out.stderr));
    assert!(
        msg.contains(&format!("{}:6:", bad.display())) && msg.contains("bare_lf"),
        "expected \"FILE:LINE: key: reason\", got {msg:?}"
    );

    // No listener at all.
    let none = write_config(dir.path(), "hostname = \"mx.test\"\n");
    let out = Command::new(bin())
        .args(["check-config", "--config"])
        .arg(&none)
        .output()
        .unwrap();
    assert!(!out.status.success(), "config without a listener accepted");
}

#[test]
fn run_with_invalid_config_fails() {
    let dir = tempfile::tempdir().unwrap();
    let bad = write_config(
        dir.path(),
        "[[listener]]\naddress = \"127.0.0.1:2525\"\n[limits]\nmax_command_line = \"lots\"\n",
    );
    let mut command = Command::new(bin());
    command.args(["run", "--config"]).arg(&bad);
    let done = common::run_bounded_blocking(command, dir.path(), Duration::from_secs(60));
    let status = done
        .status
        .unwrap_or_else(|| panic!("run with an invalid config did not exit"));
    assert!(!status.success(), "run accepted an invalid config");
}

#[test]
fn make_cert_writes_pem_files() {
    let dir = tempfile::tempdir().unwrap();
    let out = Command::new(bin())
        .args(["make-cert", "--dir"])
        .arg(dir.path())
        .args(["--name", "mx.test"])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "make-cert failed: {}{}",
        show(&out.stdout),
        show(&out.stderr)
    );
    let crt = std::fs::read_to_string(dir.path().join("server.crt")).unwrap();
    let key = std::fs::read_to_string(dir.path().join("server.key")).unwrap();
    assert!(crt.contains("-----BEGIN CERTIFICATE-----"), "{crt}");
    assert!(key.contains("PRIVATE KEY-----"), "key file is not PEM");
}
