//! Security properties: SMTP smuggling (S1), bare LF policy, STARTTLS injection (S2),
//! CR/LF injection into commands (S3), open relay on an inbound listener (S4) and
//! client-sent XCLIENT/XFORWARD (S5).

mod common;

use common::fake_mta::Script;
use common::smtp_client::{assert_reply, simple_message};
use common::{
    assert_canonical_crlf, assert_next_hop_canonical, bounded, contains, setup, setup_with, show,
};

const FIRST: &[u8] =
    b"From: <alice@x.example>\r\nTo: <bob@y.example>\r\nSubject: first-message\r\n\r\nfirst body line\r\n";
const SMUGGLED: &[u8] = b"MAIL FROM:<evil@attacker.example>\r\nRCPT TO:<victim@y.example>\r\nDATA\r\nFrom: <evil@attacker.example>\r\nTo: <victim@y.example>\r\nSubject: smuggled-message\r\n\r\nsmuggled body\r\n";

/// Send one message whose content embeds `vector` followed by a complete smuggled
/// transaction, terminated by the only real CRLF.CRLF. The next hop (lenient about
/// end-of-data, like the MTAs hit by SMTP smuggling) must receive exactly ONE canonical
/// message, and the client exactly one reply.
async fn smuggling_attempt(vector: &[u8]) {
    let s = Script {
        lenient_data_end: true,
        ..Script::default()
    };
    let (mta, proxy) = setup(s).await;
    let mut c = proxy.connect_ehlo("smuggler.example").await;
    c.expect("MAIL FROM:<alice@x.example>", "250 2.1.0").await;
    c.expect("RCPT TO:<bob@y.example>", "250").await;
    c.expect("DATA", "354").await;
    let mut payload = FIRST.to_vec();
    payload.extend_from_slice(vector);
    payload.extend_from_slice(SMUGGLED);
    payload.extend_from_slice(b".\r\n");
    c.send_raw(&payload).await;
    let fin = c.read_reply().await;
    assert_eq!(fin.code, 250, "end of data: {fin:?}");
    // Exactly one reply for the whole payload: the next reply belongs to NOOP.
    let n = c.cmd("NOOP").await;
    assert_reply(
        &n,
        "250 2.0.0",
        "reply after the message (an injected command was answered?)",
    );
    assert!(
        c.pending().is_empty(),
        "extra replies: {:?}",
        show(c.pending())
    );

    let msgs = mta.messages();
    assert_eq!(
        msgs.len(),
        1,
        "next hop must see exactly one message for vector {:?}:\n{}",
        show(vector),
        mta.transcripts_debug()
    );
    let m = &msgs[0];
    assert!(m.accepted);
    assert_eq!(m.rcpt_addrs(), vec!["bob@y.example".to_string()]);
    assert_canonical_crlf("message content at the next hop", &m.raw);
    assert!(
        contains(&m.data, b"MAIL FROM:<evil@attacker.example>")
            && contains(&m.data, b"smuggled body"),
        "smuggled commands must stay content of the one message: {:?}",
        m.data_str()
    );
    assert!(contains(&m.data, b"first body line"));
    let cmds = mta.all_commands();
    let mails = cmds
        .iter()
        .filter(|l| l.to_ascii_uppercase().starts_with("MAIL "))
        .count();
    let datas = cmds
        .iter()
        .filter(|l| l.eq_ignore_ascii_case("DATA"))
        .count();
    assert_eq!((mails, datas), (1, 1), "next hop commands: {cmds:?}");
    assert!(
        !cmds.iter().any(|l| l.contains("evil@attacker")),
        "smuggled command reached the next hop as a command: {cmds:?}"
    );
    assert_next_hop_canonical(&mta);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn smuggling_lf_dot_lf() {
    bounded(smuggling_attempt(b"\n.\n")).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn smuggling_cr_dot_cr() {
    bounded(smuggling_attempt(b"\r.\r")).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn smuggling_lf_dot_crlf() {
    bounded(smuggling_attempt(b"\n.\r\n")).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn smuggling_crlf_dot_lf() {
    bounded(smuggling_attempt(b"\r\n.\n")).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn smuggling_cr_dot_crlf() {
    bounded(smuggling_attempt(b"\r.\r\n")).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn smuggling_bare_lf_lines() {
    // Bare LF line endings throughout, with a "." line in the middle.
    bounded(smuggling_attempt(
        b"bare lf line\nanother\n.\nMAIL FROM:<x@y>\n",
    ))
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bare_lf_and_cr_normalized() {
    bounded(async {
        let (mta, proxy) = setup(Script::default()).await;
        let mut c = proxy.connect_ehlo("client.example").await;
        c.expect("MAIL FROM:<a@x.example>", "250 2.1.0").await;
        c.expect("RCPT TO:<b@y.example>", "250").await;
        c.expect("DATA", "354").await;
        c.send_raw(b"Subject: norm\r\n\r\nline one\nline two\r\nstray\rcr\r\n.\r\n")
            .await;
        let fin = c.read_reply().await;
        assert_eq!(fin.code, 250, "{fin:?}");
        let m = &mta.accepted()[0];
        assert!(
            m.data.ends_with(b"line one\r\nline two\r\nstray cr\r\n"),
            "bare LF must become CRLF and bare CR a space: {:?}",
            m.data_str()
        );
        assert_next_hop_canonical(&mta);
    })
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bare_lf_reject_policy() {
    bounded(async {
        let (mta, proxy) = setup_with(Script::default(), |o| o.limit("bare_lf = \"reject\"")).await;
        let mut c = proxy.connect_ehlo("client.example").await;

        // A plain bare LF.
        c.expect("MAIL FROM:<a@x.example>", "250 2.1.0").await;
        c.expect("RCPT TO:<b@y.example>", "250").await;
        c.expect("DATA", "354").await;
        c.send_raw(b"Subject: bare\r\n\r\nline one\nline two\r\n.\r\n")
            .await;
        assert_reply(
            &c.read_reply().await,
            "554 5.5.2",
            "bare LF with bare_lf=reject",
        );

        // A smuggling attempt: still exactly one reply, 554 5.5.2.
        c.expect("RSET", "250 2.0.0").await;
        c.expect("MAIL FROM:<a@x.example>", "250 2.1.0").await;
        c.expect("RCPT TO:<b@y.example>", "250").await;
        c.expect("DATA", "354").await;
        let mut payload = FIRST.to_vec();
        payload.extend_from_slice(b"\n.\r\n");
        payload.extend_from_slice(SMUGGLED);
        payload.extend_from_slice(b".\r\n");
        c.send_raw(&payload).await;
        assert_reply(
            &c.read_reply().await,
            "554 5.5.2",
            "smuggling with bare_lf=reject",
        );
        c.expect("NOOP", "250 2.0.0").await;
        assert!(
            mta.messages().is_empty(),
            "rejected messages reached the next hop:\n{}",
            mta.transcripts_debug()
        );

        // A clean message still goes through.
        c.expect("RSET", "250 2.0.0").await;
        let body = simple_message("a@x.example", "b@y.example", "clean", "all CRLF");
        let fin = c.send_mail("a@x.example", &["b@y.example"], &body).await;
        assert_eq!(fin.code, 250, "{fin:?}");
        assert_eq!(mta.messages().len(), 1);
        assert_next_hop_canonical(&mta);
    })
    .await
}

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
async fn open_relay_denied_on_inbound_listener() {
    bounded(async {
        // Inbound mail is verified (issue 3): a loopback DNS that answers NXDOMAIN for
        // everything keeps the checks quick and deterministic (no temperror deferral).
        let dns = common::dns::DnsServer::start(common::dns::Zone::new());
        let (mta, proxy) = setup_with(Script::default(), |mut o| {
            o.role = "inbound".into();
            o.local_domains = vec!["example.com".into()];
            o.dns_nameserver = Some(dns.nameserver());
            o
        })
        .await;
        let mut c = proxy.connect_ehlo("outside.example").await;
        c.expect("MAIL FROM:<x@ext.example>", "250 2.1.0").await;
        c.expect("RCPT TO:<y@other.example>", "550 5.7.1").await;
        c.expect("RCPT TO:<y@sub.example.com>", "550 5.7.1").await;
        let r = c.cmd("RCPT TO:<@example.com:y@other.example>").await;
        assert_eq!(r.code / 100, 5, "source-routed relay attempt: {r:?}");
        c.expect("DATA", "554 5.5.1").await;
        assert_eq!(
            mta.connection_count(),
            0,
            "the next hop must not be contacted for relay-denied recipients"
        );
        c.expect("RSET", "250 2.0.0").await;

        // A local domain (case-insensitive) is relayed.
        c.expect("MAIL FROM:<x@ext.example>", "250 2.1.0").await;
        c.expect("RCPT TO:<user@EXAMPLE.COM>", "250").await;
        c.expect("RCPT TO:<z@other.example>", "550 5.7.1").await;
        let fin = c
            .data(&simple_message(
                "x@ext.example",
                "user@example.com",
                "inbound-ok",
                "x",
            ))
            .await;
        assert_eq!(fin.code, 250, "{fin:?}");
        let msgs = mta.accepted();
        assert_eq!(msgs.len(), 1);
        assert_eq!(msgs[0].rcpt_addrs().len(), 1);
        assert!(msgs[0].rcpt_addrs()[0].eq_ignore_ascii_case("user@example.com"));
        assert!(
            !mta.all_commands()
                .iter()
                .any(|l| l.contains("other.example"))
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
