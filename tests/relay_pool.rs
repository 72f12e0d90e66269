//! The next-hop connection pool (`[next_hop] pool_size`, `pool_idle_timeout`): client
//! sessions reuse one next-hop connection, each announced with its own XCLIENT; a
//! connection goes back to the pool without RSET when its transaction ended with the
//! answer to the end of data, and after an RSET when one was left open; a pooled connection the next hop closed is replaced without the
//! client noticing; a session with a login never shares its connection; idle connections
//! are closed with QUIT; `pool_size = 0` is one connection per session.

mod common;

use std::time::Duration;

use common::fake_mta::{FakeMta, Script};
use common::smtp_client::{Client, assert_reply, simple_message};
use common::{Proxy, assert_next_hop_canonical, bounded, setup_with};

/// One whole client session: EHLO as `helo`, one message, QUIT, and the proxy's close
/// (after which its next-hop connection is back in the pool). Returns the client's port.
async fn one_session(proxy: &Proxy, helo: &str, subject: &str) -> u16 {
    let mut c = proxy.connect_ehlo(helo).await;
    let port = c.local_addr().port();
    let body = simple_message("s@x.example", "r@y.example", subject, "pooled");
    let r = c.send_mail("s@x.example", &["r@y.example"], &body).await;
    assert_reply(&r, "250", subject);
    finish(c).await;
    port
}

async fn finish(mut c: Client) {
    c.expect("QUIT", "221").await;
    c.expect_eof().await;
}

/// Waits (bounded) until `cond` holds on the fake's records.
async fn eventually(mta: &FakeMta, what: &str, cond: impl Fn(&FakeMta) -> bool) {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    while !cond(mta) {
        assert!(
            tokio::time::Instant::now() < deadline,
            "{what}: never happened; connections {:#?}",
            mta.conns()
                .iter()
                .map(|c| c.commands.clone())
                .collect::<Vec<_>>()
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test]
async fn sessions_share_one_next_hop_connection_with_xclient_each() {
    bounded(async {
        let (mta, proxy) = setup_with(Script::default(), |o| o).await;
        let mut ports = Vec::new();
        for n in 0..4 {
            ports.push(
                one_session(&proxy, &format!("client{n}.example"), &format!("msg {n}")).await,
            );
        }
        assert_eq!(
            mta.connection_count(),
            1,
            "four client sessions, one next-hop connection"
        );
        let msgs = mta.accepted();
        assert_eq!(msgs.len(), 4);
        for (n, m) in msgs.iter().enumerate() {
            // Each message was announced with the client of its own session.
            let attrs = m.xclient.clone().expect("XCLIENT before the message");
            let get = |k: &str| attrs.iter().find(|(a, _)| a == k).map(|(_, v)| v.clone());
            assert_eq!(get("ADDR").as_deref(), Some("127.0.0.1"), "message {n}");
            assert_eq!(get("PORT"), Some(ports[n].to_string()), "message {n}");
            assert_eq!(
                get("HELO"),
                Some(format!("client{n}.example")),
                "message {n}"
            );
            assert!(m.data_str().contains(&format!("msg {n}")));
        }
        // XCLIENT per session; every transaction ended with the answer to its end of
        // data, so no RSET; never a QUIT while it is pooled.
        let verbs = mta.conns()[0].verbs();
        assert_eq!(
            verbs.iter().filter(|v| *v == "XCLIENT").count(),
            4,
            "{verbs:?}"
        );
        assert!(!verbs.iter().any(|v| v == "RSET"), "{verbs:?}");
        assert!(!verbs.iter().any(|v| v == "QUIT"), "{verbs:?}");
        let mut after_first = verbs.iter().skip_while(|v| *v != "DATA");
        assert_eq!(
            after_first.nth(1).map(String::as_str),
            Some("XCLIENT"),
            "{verbs:?}"
        );
        assert_next_hop_canonical(&mta);
    })
    .await
}

#[tokio::test]
async fn pooled_connection_the_next_hop_dropped_is_replaced_unnoticed() {
    bounded(async {
        let (mta, proxy) = setup_with(Script::default(), |o| o).await;
        one_session(&proxy, "first.example", "before the restart").await;
        assert_eq!(mta.connection_count(), 1);
        // The next hop restarts: the pooled connection is dead.
        mta.crash();
        let addr = mta.addr;
        drop(mta);
        let mta = FakeMta::restart_at(addr, Script::default(), Duration::from_secs(10)).await;
        // The client sees nothing of it: RCPT, DATA and the final reply all succeed.
        let port = one_session(&proxy, "second.example", "after the restart").await;
        let msgs = mta.accepted();
        assert_eq!(msgs.len(), 1);
        assert_eq!(mta.connection_count(), 1);
        let attrs = msgs[0].xclient.clone().unwrap();
        assert!(
            attrs.contains(&("PORT".into(), port.to_string())),
            "{attrs:?}"
        );
    })
    .await
}

#[tokio::test]
async fn without_xclient_the_pooled_connection_is_reset_and_reused() {
    bounded(async {
        let (mta, proxy) = setup_with(Script::default(), |o| {
            let mut o = o;
            o.xclient = "off".into();
            o
        })
        .await;
        for n in 0..3 {
            one_session(&proxy, "c.example", &format!("plain {n}")).await;
        }
        assert_eq!(mta.connection_count(), 1);
        assert_eq!(mta.accepted().len(), 3);
        let verbs = mta.conns()[0].verbs();
        assert!(!verbs.iter().any(|v| v == "XCLIENT"), "{verbs:?}");
        // EHLO once, then per message MAIL RCPT DATA, nothing else.
        assert_eq!(
            verbs,
            [
                "EHLO", "MAIL", "RCPT", "DATA", "MAIL", "RCPT", "DATA", "MAIL", "RCPT", "DATA"
            ],
        );
    })
    .await
}

/// A session that leaves a transaction open at the next hop (the client quit after
/// RCPT) parks its connection only after an RSET the next hop accepted; the next session
/// then starts cleanly on it.
#[tokio::test]
async fn a_transaction_left_open_is_reset_before_the_connection_is_pooled() {
    bounded(async {
        let (mta, proxy) = setup_with(Script::default(), |o| {
            let mut o = o;
            o.xclient = "off".into();
            o
        })
        .await;
        let mut c = proxy.connect_ehlo("c.example").await;
        c.expect("MAIL FROM:<s@x.example>", "250").await;
        c.expect("RCPT TO:<r@y.example>", "250").await;
        finish(c).await;
        eventually(&mta, "RSET after the abandoned transaction", |m| {
            m.conns()[0].verbs().iter().any(|v| v == "RSET")
        })
        .await;
        one_session(&proxy, "c.example", "after the abandoned one").await;
        assert_eq!(mta.connection_count(), 1);
        assert_eq!(mta.accepted().len(), 1);
        let verbs = mta.conns()[0].verbs();
        assert_eq!(
            verbs,
            ["EHLO", "MAIL", "RCPT", "RSET", "MAIL", "RCPT", "DATA"],
        );
    })
    .await
}

/// At shutdown the pooled connection ends with QUIT: the next hop logs a clean end, not
/// a lost connection.
#[tokio::test]
async fn shutdown_says_quit_on_pooled_connections() {
    bounded(async {
        let (mta, mut proxy) = setup_with(Script::default(), |o| o).await;
        one_session(&proxy, "c.example", "before shutdown").await;
        assert_eq!(mta.connection_count(), 1);
        proxy.sigterm();
        let status = proxy.wait_exit(Duration::from_secs(20)).await;
        assert!(status.success(), "{status:?}");
        let verbs = mta.conns()[0].verbs();
        assert_eq!(verbs.last().map(String::as_str), Some("QUIT"), "{verbs:?}");
    })
    .await
}

#[tokio::test]
async fn pool_size_zero_is_one_connection_per_session() {
    bounded(async {
        let (mta, proxy) = setup_with(Script::default(), |o| o.next_hop_opt("pool_size = 0")).await;
        for n in 0..3 {
            one_session(&proxy, "c.example", &format!("unpooled {n}")).await;
        }
        assert_eq!(mta.connection_count(), 3);
        for c in mta.conns() {
            assert_eq!(
                c.verbs().last().map(String::as_str),
                Some("QUIT"),
                "{:?}",
                c.commands
            );
        }
    })
    .await
}

#[tokio::test]
async fn idle_pooled_connection_is_closed_with_quit() {
    bounded(async {
        let (mta, proxy) = setup_with(Script::default(), |o| {
            o.next_hop_opt("pool_idle_timeout = \"1s\"")
        })
        .await;
        one_session(&proxy, "c.example", "then idle").await;
        eventually(&mta, "QUIT on the idle pooled connection", |m| {
            m.conns()[0].verbs().last().map(String::as_str) == Some("QUIT")
        })
        .await;
        // The next session opens a new connection.
        one_session(&proxy, "c.example", "after idle").await;
        assert_eq!(mta.connection_count(), 2);
    })
    .await
}

#[test]
fn a_config_with_pool_keys_out_of_range_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = dir.path().join("m.toml");
    let check = |pool: &str| {
        std::fs::write(
            &cfg,
            format!(
                "local_domains = [\"x.example\"]\n\
                 [[listener]]\naddress = \"127.0.0.1:2525\"\nrole = \"inbound\"\n\n\
                 [next_hop]\naddress = \"smtp://127.0.0.1:25\"\n{pool}\n"
            ),
        )
        .unwrap();
        let out = std::process::Command::new(common::bin())
            .arg("--config")
            .arg(&cfg)
            .arg("check-config")
            .output()
            .unwrap();
        let text = String::from_utf8_lossy(&out.stderr).to_string()
            + &String::from_utf8_lossy(&out.stdout);
        (out.status.success(), text)
    };
    let (ok, text) = check("pool_size = 8\npool_idle_timeout = \"5s\"");
    assert!(ok, "{text}");
    for bad in ["pool_idle_timeout = \"10m\"", "pool_size = 100000"] {
        let (ok, text) = check(bad);
        assert!(!ok, "{bad}: {text}");
        let key = bad.split(' ').next().unwrap();
        assert!(
            text.contains("next_hop") && text.contains(key),
            "{bad}: {text}"
        );
    }
}
