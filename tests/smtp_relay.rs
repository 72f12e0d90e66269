//! End-to-end relay through the real mailwarden binary to a fake next hop:
//! plain and STARTTLS sessions, ESMTP parameters, XCLIENT and per-recipient answers.
//! Protocol-only cases (pipelining, null sender, command order, line and size limits)
//! are golden transcripts in `tests/transcripts/`.

mod common;

use common::fake_mta::{Act, FakeMta, Script};
use common::smtp_client::{assert_reply, simple_message};
use common::{Proxy, ProxyOptions, assert_next_hop_canonical, bounded, setup, setup_with, show};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn plain_session_relayed_end_to_end() {
    bounded(async {
        let (mta, proxy) = setup(Script::default()).await;
        let mut c = proxy.connect().await;

        let g = c.read_reply().await;
        assert_eq!(g.code, 220, "greeting {g:?}");
        assert_eq!(g.lines.len(), 1, "single-line greeting expected: {g:?}");
        assert!(
            g.text().starts_with("mailwarden.test ") && g.text().contains("ESMTP mailwarden"),
            "greeting must be `220 HOSTNAME ESMTP mailwarden`: {g:?}"
        );

        let e = c.ehlo("client.example").await;
        for ext in [
            "PIPELINING",
            "8BITMIME",
            "SMTPUTF8",
            "ENHANCEDSTATUSCODES",
            "DSN",
        ] {
            assert!(e.has_ext(ext), "EHLO lacks {ext}: {e:?}");
        }
        assert_eq!(e.ext_line("SIZE"), Some("SIZE 10240000"), "{e:?}");
        assert!(
            !e.has_ext("CHUNKING"),
            "CHUNKING must not be offered: {e:?}"
        );
        assert!(
            !e.has_ext("STARTTLS"),
            "STARTTLS offered without a cert: {e:?}"
        );

        c.expect("MAIL FROM:<alice@sender.example>", "250 2.1.0")
            .await;
        assert_eq!(
            mta.connection_count(),
            0,
            "the next hop must not be contacted before the first RCPT"
        );
        let r = c.cmd("RCPT TO:<bob@rcpt.example>").await;
        // The next hop's RCPT reply is passed through (code, enhanced code, text).
        assert_reply(&r, "250 2.1.5", "RCPT");
        assert!(
            r.text().contains("Ok"),
            "next-hop RCPT text not passed through: {r:?}"
        );
        assert_eq!(mta.connection_count(), 1);

        let body = simple_message(
            "alice@sender.example",
            "bob@rcpt.example",
            "plain-1",
            "Hello.\r\n.\r\n.leading dot line\r\n..\r\nBye.",
        );
        let fin = c.data(&body).await;
        assert_reply(&fin, "250 2.0.0", "end of data");
        c.expect("QUIT", "221 2.0.0").await;
        c.expect_eof().await;

        let msgs = mta.accepted();
        assert_eq!(msgs.len(), 1, "next hop must have exactly one message");
        let m = &msgs[0];
        assert_eq!(m.sender(), "alice@sender.example");
        assert_eq!(m.rcpt_addrs(), vec!["bob@rcpt.example".to_string()]);
        assert!(
            m.data.ends_with(&body),
            "body altered on the way: got {:?}",
            m.data_str()
        );
        // Dot-stuffing is redone downstream: the lone "." line travels as "..".
        assert!(
            common::contains(&m.raw, b"\r\n..\r\n..leading dot line\r\n...\r\n"),
            "next hop got badly stuffed content: {:?}",
            show(&m.raw)
        );
        assert_next_hop_canonical(&mta);
        proxy
            .wait_log("transaction", std::time::Duration::from_secs(20))
            .await;
    })
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn helo_session_relayed_with_proto_smtp() {
    bounded(async {
        let (mta, proxy) = setup(Script::default()).await;
        let mut c = proxy.connect().await;
        assert_eq!(c.read_reply().await.code, 220);
        let r = c.cmd("HELO oldclient.example").await;
        assert_eq!(r.code, 250, "HELO: {r:?}");
        let body = simple_message("a@x.example", "b@y.example", "helo-1", "hi");
        let fin = c.send_mail("a@x.example", &["b@y.example"], &body).await;
        assert_eq!(fin.code, 250, "{fin:?}");
        assert_eq!(mta.accepted().len(), 1);
        let conn = &mta.conns()[0];
        assert_eq!(conn.xclient_attr("PROTO").as_deref(), Some("SMTP"));
        assert_eq!(
            conn.xclient_attr("HELO").as_deref(),
            Some("oldclient.example")
        );
    })
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn starttls_session_relayed() {
    bounded(async {
        let (mta, proxy) = setup_with(Script::default(), |mut o| {
            o.starttls = true;
            o
        })
        .await;
        let mut c = proxy.connect().await;
        assert_eq!(c.read_reply().await.code, 220);
        let e = c.ehlo("tls.example").await;
        assert!(e.has_ext("STARTTLS"), "STARTTLS not offered: {e:?}");
        let r = c.starttls().await;
        assert_reply(&r, "220 2.0.0", "STARTTLS");
        assert!(c.is_tls());
        let e2 = c.ehlo("tls.example").await;
        assert!(
            !e2.has_ext("STARTTLS"),
            "STARTTLS offered again inside TLS: {e2:?}"
        );
        assert!(e2.has_ext("PIPELINING"));
        let body = simple_message("a@x.example", "b@y.example", "tls-1", "over TLS");
        let fin = c.send_mail("a@x.example", &["b@y.example"], &body).await;
        assert_eq!(fin.code, 250, "{fin:?}");
        c.expect("QUIT", "221 2.0.0").await;
        let msgs = mta.accepted();
        assert_eq!(msgs.len(), 1);
        assert!(msgs[0].data.ends_with(&body));
        assert_next_hop_canonical(&mta);
    })
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn next_hop_starttls_required_is_used() {
    bounded(async {
        let (mta, proxy) = setup_with(Script::default().with_starttls(), |mut o| {
            o.next_hop_tls = "require".into();
            o
        })
        .await;
        let mut c = proxy.connect_ehlo("client.example").await;
        let body = simple_message("a@x.example", "b@y.example", "nh-tls", "secret");
        let fin = c.send_mail("a@x.example", &["b@y.example"], &body).await;
        assert_eq!(fin.code, 250, "{fin:?}");
        let conns = mta.conns();
        assert_eq!(conns.len(), 1);
        assert!(conns[0].tls, "next-hop connection did not use STARTTLS");
        let verbs = conns[0].verbs();
        let pos = |v: &str| verbs.iter().position(|x| x == v);
        assert!(
            pos("STARTTLS").unwrap() < pos("MAIL").unwrap(),
            "STARTTLS must precede MAIL: {verbs:?}"
        );
        assert!(
            pos("STARTTLS").unwrap() < pos("XCLIENT").unwrap(),
            "XCLIENT must be sent inside TLS: {verbs:?}"
        );
        assert_eq!(verbs[0], "EHLO");
        assert_eq!(mta.accepted().len(), 1);
    })
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn next_hop_tls_required_but_not_offered_never_relays() {
    bounded(async {
        let (mta, proxy) = setup_with(Script::default(), |mut o| {
            o.next_hop_tls = "require".into();
            o
        })
        .await;
        let mut c = proxy.connect_ehlo("client.example").await;
        c.expect("MAIL FROM:<a@x.example>", "250 2.1.0").await;
        let r = c.cmd("RCPT TO:<b@y.example>").await;
        assert_eq!(
            r.code / 100,
            4,
            "tls=require without STARTTLS must defer: {r:?}"
        );
        assert!(
            !mta.all_commands()
                .iter()
                .any(|l| l.to_ascii_uppercase().starts_with("MAIL")),
            "MAIL sent over plaintext despite tls=require:\n{}",
            mta.transcripts_debug()
        );
        assert!(mta.messages().is_empty());
    })
    .await
}

fn has_param(params: &[String], want: &str) -> bool {
    params.iter().any(|p| p.eq_ignore_ascii_case(want))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn esmtp_params_reach_next_hop() {
    bounded(async {
        let (mta, proxy) = setup(Script::default()).await;
        let mut c = proxy.connect_ehlo("params.example").await;
        c.expect(
            "MAIL FROM:<sender@x.example> SIZE=2000 BODY=8BITMIME SMTPUTF8 RET=HDRS ENVID=QQ314159",
            "250 2.1.0",
        )
        .await;
        c.expect(
            "RCPT TO:<rcpt@y.example> NOTIFY=SUCCESS,FAILURE ORCPT=rfc822;rcpt@y.example",
            "250",
        )
        .await;
        let body = "From: <sender@x.example>\r\nSubject: Gr\u{fc}\u{df}e\r\n\r\nS\u{f6}me 8-bit t\u{e9}xt \u{2603}\r\n"
            .as_bytes()
            .to_vec();
        let fin = c.data(&body).await;
        assert_eq!(fin.code, 250, "{fin:?}");

        let msgs = mta.accepted();
        assert_eq!(msgs.len(), 1);
        let m = &msgs[0];
        let p = m.mail_params();
        assert!(
            p.iter().any(|x| x.to_ascii_uppercase().starts_with("SIZE=")),
            "SIZE missing in {:?}",
            m.mail
        );
        for want in ["BODY=8BITMIME", "SMTPUTF8", "RET=HDRS", "ENVID=QQ314159"] {
            assert!(has_param(&p, want), "{want} missing in next-hop MAIL {:?}", m.mail);
        }
        let rp = common::fake_mta::params_after_path(&m.rcpts[0]);
        assert!(
            has_param(&rp, "NOTIFY=SUCCESS,FAILURE"),
            "NOTIFY missing in next-hop RCPT {:?}",
            m.rcpts[0]
        );
        assert!(
            has_param(&rp, "ORCPT=rfc822;rcpt@y.example"),
            "ORCPT missing in next-hop RCPT {:?}",
            m.rcpts[0]
        );
        assert!(m.data.ends_with(&body), "8-bit body altered: {:?}", m.data_str());
    })
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dsn_params_not_sent_to_next_hop_without_dsn() {
    bounded(async {
        let (mta, proxy) = setup(Script::default().without_cap("DSN")).await;
        let mut c = proxy.connect_ehlo("params.example").await;
        c.expect(
            "MAIL FROM:<sender@x.example> RET=FULL ENVID=abc",
            "250 2.1.0",
        )
        .await;
        c.expect("RCPT TO:<rcpt@y.example> NOTIFY=NEVER", "250")
            .await;
        let fin = c
            .data(&simple_message(
                "sender@x.example",
                "rcpt@y.example",
                "nodsn",
                "x",
            ))
            .await;
        assert_eq!(fin.code, 250, "{fin:?}");
        let m = &mta.accepted()[0];
        let up = m.mail.to_ascii_uppercase();
        assert!(
            !up.contains("RET=") && !up.contains("ENVID="),
            "DSN params sent to a next hop without DSN: {:?}",
            m.mail
        );
        assert!(
            !m.rcpts[0].to_ascii_uppercase().contains("NOTIFY="),
            "{:?}",
            m.rcpts[0]
        );
    })
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn xclient_carries_real_client_addr_and_helo() {
    bounded(async {
        let (mta, proxy) = setup(Script::default()).await;
        let mut c = proxy.connect_ehlo("client.example").await;
        let client_port = c.local_addr().port();
        let body = simple_message("a@x.example", "b@y.example", "xclient-1", "hi");
        let fin = c.send_mail("a@x.example", &["b@y.example"], &body).await;
        assert_eq!(fin.code, 250, "{fin:?}");

        let conns = mta.conns();
        assert_eq!(conns.len(), 1);
        let conn = &conns[0];
        assert_eq!(
            conn.xclient.len(),
            1,
            "expected one XCLIENT: {:?}",
            conn.commands
        );
        assert_eq!(conn.xclient_attr("ADDR").as_deref(), Some("127.0.0.1"));
        assert_eq!(conn.xclient_attr("PORT"), Some(client_port.to_string()));
        assert_eq!(conn.xclient_attr("HELO").as_deref(), Some("client.example"));
        assert_eq!(conn.xclient_attr("PROTO").as_deref(), Some("ESMTP"));
        assert_eq!(conn.xclient_attr("NAME").as_deref(), Some("[UNAVAILABLE]"));
        // Postfix semantics: EHLO, XCLIENT (answered 220), EHLO again, then MAIL.
        let verbs = conn.verbs();
        assert_eq!(
            &verbs[..4],
            &["EHLO", "XCLIENT", "EHLO", "MAIL"],
            "{verbs:?}"
        );
        let m = &mta.accepted()[0];
        assert!(m.xclient.is_some(), "message relayed before XCLIENT");
    })
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn xclient_required_but_not_offered_defers_at_rcpt() {
    bounded(async {
        let (mta, proxy) = setup(Script::default().without_cap("XCLIENT")).await;
        let mut c = proxy.connect_ehlo("client.example").await;
        c.expect("MAIL FROM:<a@x.example>", "250 2.1.0").await;
        c.expect("RCPT TO:<b@y.example>", "451 4.3.0").await;
        c.expect("DATA", "554 5.5.1").await;
        assert!(
            !mta.all_commands()
                .iter()
                .any(|l| l.to_ascii_uppercase().starts_with("MAIL")),
            "relayed through a next hop without XCLIENT:\n{}",
            mta.transcripts_debug()
        );
        c.expect("RSET", "250 2.0.0").await;
        c.expect("NOOP", "250 2.0.0").await;
    })
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn per_recipient_replies_passed_through() {
    bounded(async {
        let mut s = Script::default();
        s.rcpt_by_addr.push((
            "<nobody@".into(),
            Act::reply("550 5.1.1 <nobody@y.example>: Recipient address rejected: User unknown"),
        ));
        let (mta, proxy) = setup(s).await;
        let mut c = proxy.connect_ehlo("client.example").await;
        c.expect("MAIL FROM:<a@x.example>", "250 2.1.0").await;
        c.expect("RCPT TO:<one@y.example>", "250 2.1.5").await;
        let r = c.cmd("RCPT TO:<nobody@y.example>").await;
        assert_reply(&r, "550 5.1.1", "rejected recipient");
        assert!(
            r.text().contains("User unknown"),
            "next-hop text not passed through: {r:?}"
        );
        c.expect("RCPT TO:<three@y.example>", "250 2.1.5").await;
        let body = simple_message("a@x.example", "one@y.example", "rcpts-1", "x");
        let fin = c.data(&body).await;
        assert_eq!(fin.code, 250, "{fin:?}");
        let msgs = mta.accepted();
        assert_eq!(msgs.len(), 1);
        assert_eq!(
            msgs[0].rcpt_addrs(),
            vec!["one@y.example".to_string(), "three@y.example".to_string()]
        );
    })
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn all_recipients_rejected_data_gets_554() {
    bounded(async {
        let s = Script {
            rcpt: Act::reply("550 5.1.1 User unknown"),
            ..Script::default()
        };
        let (mta, proxy) = setup(s).await;
        let mut c = proxy.connect_ehlo("client.example").await;
        c.expect("MAIL FROM:<a@x.example>", "250 2.1.0").await;
        c.expect("RCPT TO:<u1@y.example>", "550 5.1.1").await;
        c.expect("RCPT TO:<u2@y.example>", "550 5.1.1").await;
        c.expect("DATA", "554 5.5.1").await;
        assert!(
            !mta.all_commands()
                .iter()
                .any(|l| l.eq_ignore_ascii_case("DATA")),
            "DATA sent to next hop without accepted recipients"
        );
        c.expect("RSET", "250 2.0.0").await;
    })
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn listening_line_logged() {
    bounded(async {
        let mta = FakeMta::start(Script::default()).await;
        let proxy = Proxy::start(ProxyOptions::smtp(mta.addr)).await;
        let log = proxy
            .wait_log("listening", std::time::Duration::from_secs(20))
            .await;
        let line = log
            .lines()
            .find(|l| l.contains("listening"))
            .unwrap()
            .to_string();
        assert!(
            line.contains(&proxy.addr.to_string()),
            "listening line lacks the address {}: {line:?}",
            proxy.addr
        );
    })
    .await
}

/// A next hop that offers CHUNKING gets the message in one `BDAT <size> LAST` (no DATA
/// round trip) with the very bytes a DATA next hop reads after unstuffing; lines that
/// start with a dot go unstuffed, and the size is the whole message, added headers too.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn chunking_next_hop_gets_one_bdat_with_the_same_bytes() {
    bounded(async {
        let mut with_chunking = Script::default();
        with_chunking.caps.push("CHUNKING".into());
        let mut body = simple_message("a@x.example", "r@y.example", "chunked", "first line");
        body.extend_from_slice(b".leading dot\r\n..two dots\r\n.\r\nBDAT 5 LAST\r\nend\r\n");
        let mut received = Vec::new();
        for script in [Script::default(), with_chunking] {
            let (mta, proxy) = setup(script).await;
            let mut c = proxy.connect_ehlo("client.example").await;
            let fin = c.send_mail("a@x.example", &["r@y.example"], &body).await;
            assert_eq!(fin.code, 250, "{fin:?}");
            c.expect("QUIT", "221").await;
            let msgs = mta.accepted();
            assert_eq!(msgs.len(), 1);
            assert!(msgs[0].data.ends_with(&body), "{}", msgs[0].data_str());
            assert_next_hop_canonical(&mta);
            received.push((msgs[0].clone(), mta.all_commands()));
        }
        let ((by_data, data_cmds), (by_bdat, bdat_cmds)) = (&received[0], &received[1]);
        assert!(data_cmds.iter().any(|c| c == "DATA"), "{data_cmds:?}");
        assert!(by_data.raw.windows(5).any(|w| w == b"\r\n...".as_slice()));
        let bdat = format!("BDAT {} LAST", by_bdat.data.len());
        assert!(bdat_cmds.contains(&bdat), "{bdat} in {bdat_cmds:?}");
        assert!(!bdat_cmds.iter().any(|c| c == "DATA"), "{bdat_cmds:?}");
        assert_eq!(by_bdat.raw, by_bdat.data, "nothing is stuffed in a chunk");
        // Same message, same added header fields (their values carry the session's
        // time and id), same bytes of the client's message.
        let header_names = |m: &common::fake_mta::Message| -> Vec<String> {
            let added = &m.data[..m.data.len() - body.len()];
            show(added)
                .lines()
                .filter(|l| !l.starts_with([' ', '\t']))
                .filter_map(|l| l.split(':').next().map(str::to_string))
                .collect()
        };
        assert_eq!(header_names(by_data), header_names(by_bdat));
    })
    .await
}
