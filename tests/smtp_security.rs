//! Security properties that need a real next hop or TLS: STARTTLS injection (S2), CR/LF
//! injection into commands as the next hop's XCLIENT shows it (S3) and client-sent
//! XCLIENT/XFORWARD (S5). The protocol-only cases (SMTP smuggling S1, the bare LF
//! policy, open relay on an inbound listener S4) are golden transcripts in
//! `tests/transcripts/` (`smuggling_*.txt`, `bare_lf_*.txt`, `open_relay_*.txt`).

mod common;

use common::fake_mta::Script;
use common::smtp_client::{assert_reply, simple_message};
use common::{assert_next_hop_canonical, bounded, contains, setup, setup_with, show};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn starttls_plaintext_injection_discarded() {
    bounded(async {
        let (mta, proxy) = setup_with(Script::default(), |mut o| {
            o.starttls = true;
            o
        })
        .await;
        let mut c = proxy.connect_ehlo("client.example").await;
        c.send_raw(b"STARTTLS\r\nMAIL FROM:<a@b.example>\r\n").await;
        let r = c.read_reply().await;
        assert_reply(&r, "220 2.0.0", "STARTTLS");
        // No reply to the injected MAIL may be sent in plaintext before the handshake.
        c.upgrade_tls().await;
        // The first reply inside TLS must be the one for our NOOP, not for the injected MAIL.
        let n = c.cmd("NOOP").await;
        assert_reply(&n, "250 2.0.0", "first reply after the TLS handshake");
        // State was reset: MAIL before a new EHLO is out of sequence.
        c.expect("MAIL FROM:<a@b.example>", "503 5.5.1").await;
        c.ehlo("client.example").await;
        let body = simple_message("a@b.example", "c@d.example", "after-tls", "x");
        let fin = c.send_mail("a@b.example", &["c@d.example"], &body).await;
        assert_eq!(fin.code, 250, "{fin:?}");
        c.expect("QUIT", "221 2.0.0").await;
        let rest = c.expect_eof().await;
        assert!(
            rest.is_empty(),
            "unexpected trailing bytes: {:?}",
            show(&rest)
        );
        // Exactly one transaction (ours, after EHLO) reached the next hop.
        let msgs = mta.accepted();
        assert_eq!(msgs.len(), 1);
        assert_eq!(msgs[0].rcpt_addrs(), vec!["c@d.example".to_string()]);
    })
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn next_hop_starttls_injection_discarded() {
    bounded(async {
        // The next hop appends a plaintext reply right after its STARTTLS 220. mailwarden
        // must discard it, not take it as the answer to its post-TLS EHLO.
        let mut s = Script::default().with_starttls();
        s.starttls_inject = Some(b"250 2.0.0 injected-reply\r\n".to_vec());
        let (mta, proxy) = setup_with(s, |mut o| {
            o.next_hop_tls = "require".into();
            o
        })
        .await;
        let mut c = proxy.connect_ehlo("client.example").await;
        c.expect("MAIL FROM:<a@x.example>", "250 2.1.0").await;
        let r = c.cmd("RCPT TO:<b@y.example>").await;
        eprintln!("next-hop STARTTLS injection: RCPT answered {r:?}");
        assert!(
            !r.full_text().contains("injected-reply"),
            "injected next-hop bytes surfaced to the client: {r:?}"
        );
        if r.code == 250 {
            let fin = c
                .data(&simple_message("a@x.example", "b@y.example", "inj", "x"))
                .await;
            assert_eq!(fin.code, 250, "{fin:?}");
            assert!(!fin.full_text().contains("injected-reply"));
            assert_eq!(mta.accepted().len(), 1);
            assert!(mta.conns()[0].tls);
        } else {
            // Failing closed is acceptable too, but then only with a 4xx.
            assert_eq!(r.code / 100, 4, "{r:?}");
            assert!(mta.messages().is_empty());
        }
    })
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cr_injection_in_helo_rejected() {
    bounded(async {
        let (mta, proxy) = setup(Script::default()).await;
        let mut c = proxy.connect().await;
        assert_eq!(c.read_reply().await.code, 220);
        c.send_raw(b"EHLO evil.example\rXCLIENT ADDR=6.6.6.6\r\n")
            .await;
        assert_reply(&c.read_reply().await, "501 5.5.2", "bare CR in EHLO");
        c.ehlo("good.example").await;
        let fin = c
            .send_mail(
                "a@x.example",
                &["b@y.example"],
                &simple_message("a@x.example", "b@y.example", "crinj", "x"),
            )
            .await;
        assert_eq!(fin.code, 250, "{fin:?}");
        let conn = &mta.conns()[0];
        assert_eq!(conn.xclient_attr("HELO").as_deref(), Some("good.example"));
        assert_eq!(conn.xclient_attr("ADDR").as_deref(), Some("127.0.0.1"));
        assert!(!contains(&mta.all_bytes(), b"6.6.6.6"));
        assert_next_hop_canonical(&mta);
    })
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn helo_special_chars_are_xtext_encoded() {
    bounded(async {
        let (mta, proxy) = setup(Script::default()).await;
        let mut c = proxy.connect().await;
        assert_eq!(c.read_reply().await.code, 220);
        let r = c.cmd("EHLO we+ird=name.example").await;
        if r.code == 501 {
            return; // refusing the name is acceptable
        }
        assert_eq!(r.code, 250, "{r:?}");
        let fin = c
            .send_mail(
                "a@x.example",
                &["b@y.example"],
                &simple_message("a@x.example", "b@y.example", "xtext", "x"),
            )
            .await;
        assert_eq!(fin.code, 250, "{fin:?}");
        let conn = &mta.conns()[0];
        assert_eq!(
            conn.xclient_attr("HELO").as_deref(),
            Some("we+2Bird+3Dname.example"),
            "HELO must be xtext-encoded in XCLIENT: {:?}",
            conn.commands
        );
    })
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn client_xclient_and_xforward_rejected_identity_unchanged() {
    bounded(async {
        let (mta, proxy) = setup(Script::default()).await;
        let mut c = proxy.connect_ehlo("client.example").await;
        c.expect(
            "XCLIENT ADDR=10.9.8.7 NAME=trusted.example HELO=trusted.example",
            "502 5.5.1",
        )
        .await;
        c.expect("XFORWARD ADDR=10.9.8.7", "502 5.5.1").await;
        let fin = c
            .send_mail(
                "a@x.example",
                &["b@y.example"],
                &simple_message("a@x.example", "b@y.example", "noxclient", "x"),
            )
            .await;
        assert_eq!(fin.code, 250, "{fin:?}");
        let conns = mta.conns();
        assert_eq!(conns[0].xclient.len(), 1, "{:?}", conns[0].commands);
        assert_eq!(conns[0].xclient_attr("ADDR").as_deref(), Some("127.0.0.1"));
        assert_eq!(
            conns[0].xclient_attr("HELO").as_deref(),
            Some("client.example")
        );
        let all = mta.all_bytes();
        assert!(
            !contains(&all, b"10.9.8.7"),
            "client identity leaked: {}",
            show(&all)
        );
        assert!(!contains(&all, b"XFORWARD"));
    })
    .await
}
