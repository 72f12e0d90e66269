//! Listener variants (implicit TLS, PROXY protocol), XCLIENT modes, large and
//! concurrent messages, and the shared message-memory budget. The session limits
//! (recipients, loops, errors, timeouts, size) and client failures during DATA are
//! golden transcripts in `tests/transcripts/`.

mod admin_common;
mod common;

use std::collections::BTreeSet;
use std::time::Duration;

use common::fake_mta::{Act, Script};
use common::smtp_client::{Client, assert_reply, dot_stuff_and_terminate, simple_message};
use common::{assert_next_hop_canonical, bounded, contains, rss_kib, setup, setup_with, show};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn implicit_tls_listener_relays() {
    bounded(async {
        let (mta, proxy) = setup_with(Script::default(), |mut o| {
            o.implicit_tls = true;
            o
        })
        .await;
        let mut c = proxy.connect_any().await;
        assert!(c.is_tls());
        let g = c.read_reply().await;
        assert_eq!(g.code, 220, "{g:?}");
        let e = c.ehlo("tls465.example").await;
        assert!(
            !e.has_ext("STARTTLS"),
            "STARTTLS inside implicit TLS: {e:?}"
        );
        let body = simple_message("a@x.example", "b@y.example", "implicit", "x");
        let fin = c.send_mail("a@x.example", &["b@y.example"], &body).await;
        assert_eq!(fin.code, 250, "{fin:?}");
        assert!(mta.accepted()[0].data.ends_with(&body));

        // Plaintext SMTP on the implicit-TLS port gets no SMTP greeting.
        let mut p = proxy.connect().await;
        p.send_raw(b"EHLO plain.example\r\n").await;
        let rest = p.expect_eof().await;
        assert!(
            !rest.starts_with(b"220") && !contains(&rest, b"250"),
            "implicit-TLS listener spoke plaintext SMTP: {:?}",
            show(&rest)
        );
    })
    .await
}

fn proxy_v2_tcp4(src: [u8; 4], dst: [u8; 4], sport: u16, dport: u16) -> Vec<u8> {
    let mut h = b"\r\n\r\n\x00\r\nQUIT\n".to_vec();
    h.push(0x21); // version 2, PROXY
    h.push(0x11); // AF_INET, STREAM
    h.extend_from_slice(&12u16.to_be_bytes());
    h.extend_from_slice(&src);
    h.extend_from_slice(&dst);
    h.extend_from_slice(&sport.to_be_bytes());
    h.extend_from_slice(&dport.to_be_bytes());
    h
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn proxy_protocol_from_trusted_proxy_sets_client_identity() {
    bounded(async {
        let (mta, proxy) = setup_with(Script::default(), |mut o| {
            o.proxy_protocol = true;
            o.trusted_proxies = vec!["127.0.0.1/32".into()];
            o
        })
        .await;
        // v1
        let mut c = proxy.connect().await;
        c.send_raw(b"PROXY TCP4 192.0.2.10 198.51.100.1 40000 25\r\n")
            .await;
        assert_eq!(c.read_reply().await.code, 220);
        c.ehlo("v1.example").await;
        let fin = c
            .send_mail(
                "a@x.example",
                &["b@y.example"],
                &simple_message("a@x.example", "b@y.example", "pp-v1", "x"),
            )
            .await;
        assert_eq!(fin.code, 250, "{fin:?}");
        // v2
        let mut c = proxy.connect().await;
        c.send_raw(&proxy_v2_tcp4(
            [192, 0, 2, 11],
            [198, 51, 100, 1],
            40001,
            25,
        ))
        .await;
        assert_eq!(c.read_reply().await.code, 220);
        c.ehlo("v2.example").await;
        let fin = c
            .send_mail(
                "a@x.example",
                &["b@y.example"],
                &simple_message("a@x.example", "b@y.example", "pp-v2", "x"),
            )
            .await;
        assert_eq!(fin.code, 250, "{fin:?}");

        let conns = mta.conns();
        assert_eq!(conns.len(), 2);
        assert_eq!(conns[0].xclient_attr("ADDR").as_deref(), Some("192.0.2.10"));
        assert_eq!(conns[0].xclient_attr("PORT").as_deref(), Some("40000"));
        assert_eq!(conns[0].xclient_attr("HELO").as_deref(), Some("v1.example"));
        assert_eq!(conns[1].xclient_attr("ADDR").as_deref(), Some("192.0.2.11"));
        assert_eq!(conns[1].xclient_attr("PORT").as_deref(), Some("40001"));
    })
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn proxy_protocol_from_untrusted_source_is_not_believed() {
    bounded(async {
        let (mta, proxy) = setup_with(Script::default(), |mut o| {
            o.proxy_protocol = true;
            o.trusted_proxies = vec!["10.0.0.0/8".into()];
            o
        })
        .await;
        let mut c = proxy.connect().await;
        c.send_raw(b"PROXY TCP4 192.0.2.66 198.51.100.1 40000 25\r\n")
            .await;
        // Whatever the reaction (close, error reply), the claimed address must never be
        // used. If the session survives, a transaction shows the identity used.
        let mut alive = false;
        if let Some(first) = c.try_read_reply().await {
            assert_ne!(
                first.code / 100,
                2,
                "untrusted PROXY header accepted: {first:?}"
            );
            if first.code == 220 || first.code / 100 == 5 {
                alive = c.try_send_raw(b"NOOP\r\n").await.is_ok();
            }
        }
        if alive {
            // Skip replies for the PROXY line until the NOOP's 250 (or EOF).
            let mut got_noop = false;
            while let Some(r) = c.try_read_reply().await {
                if r.code == 250 {
                    got_noop = true;
                    break;
                }
            }
            if got_noop {
                c.ehlo("untrusted.example").await;
                let fin = c
                    .send_mail(
                        "a@x.example",
                        &["b@y.example"],
                        &simple_message("a@x.example", "b@y.example", "pp-untrusted", "x"),
                    )
                    .await;
                assert_eq!(fin.code, 250, "{fin:?}");
                assert_eq!(
                    mta.conns()[0].xclient_attr("ADDR").as_deref(),
                    Some("127.0.0.1")
                );
            }
        }
        assert!(
            !contains(&mta.all_bytes(), b"192.0.2.66"),
            "untrusted PROXY address reached the next hop"
        );
    })
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn xclient_off_sends_no_xclient() {
    bounded(async {
        let (mta, proxy) = setup_with(Script::default().without_cap("XCLIENT"), |mut o| {
            o.xclient = "off".into();
            o
        })
        .await;
        let mut c = proxy.connect_ehlo("client.example").await;
        let fin = c
            .send_mail(
                "a@x.example",
                &["b@y.example"],
                &simple_message("a@x.example", "b@y.example", "xoff", "x"),
            )
            .await;
        assert_eq!(fin.code, 250, "{fin:?}");
        assert!(mta.conns()[0].xclient.is_empty());
        assert_eq!(mta.accepted().len(), 1);
    })
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn large_message_bytes_intact() {
    bounded(async {
        let (mta, proxy) = setup(Script::default()).await;
        let mut c = proxy.connect_ehlo("big.example").await;
        let mut body = simple_message("a@x.example", "b@y.example", "large", "start");
        let mut i = 0u64;
        while body.len() < 3 * 1024 * 1024 {
            // Varying lines, some starting with '.', some 998 octets long.
            let len = (i * 7919 % 998) as usize;
            let ch = b'!' + (i % 90) as u8;
            if i.is_multiple_of(13) {
                body.push(b'.');
            }
            body.extend(std::iter::repeat_n(ch, len));
            body.extend_from_slice(b"\r\n");
            i += 1;
        }
        let fin = c.send_mail("a@x.example", &["b@y.example"], &body).await;
        assert_eq!(fin.code, 250, "{fin:?}");
        let msgs = mta.accepted();
        assert_eq!(msgs.len(), 1);
        assert!(
            msgs[0].data.ends_with(&body),
            "3 MB body altered in transit"
        );
        assert_next_hop_canonical(&mta);
    })
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_sessions_no_loss_no_duplicates() {
    bounded(async {
        // Messages whose content carries "tempfail-" get 451 at end of data from the
        // next hop. Every message the client got 250 for must be at the next hop exactly
        // once; every 451 message must not be delivered.
        let s = Script {
            eod_by_content: vec![(
                "tempfail-".into(),
                Act::reply("451 4.3.0 Temporary failure, try again"),
            )],
            ..Script::default()
        };
        let (mta, proxy) = setup(s).await;
        let addr = proxy.addr;
        let mut tasks = Vec::new();
        for sess in 0..8 {
            tasks.push(tokio::spawn(async move {
                let mut c = Client::connect(addr).await;
                assert_eq!(c.read_reply().await.code, 220);
                c.ehlo(&format!("s{sess}.example")).await;
                let mut ok = Vec::new();
                let mut failed = Vec::new();
                for n in 0..4 {
                    let tag = if (sess + n) % 3 == 0 {
                        format!("tempfail-{sess}-{n}")
                    } else {
                        format!("good-{sess}-{n}")
                    };
                    let body = simple_message(
                        &format!("s{sess}@x.example"),
                        "b@y.example",
                        &tag,
                        &format!("unique {tag}"),
                    );
                    c.expect(&format!("MAIL FROM:<s{sess}@x.example>"), "250 2.1.0")
                        .await;
                    c.expect("RCPT TO:<b@y.example>", "250").await;
                    c.expect("RCPT TO:<c@y.example>", "250").await;
                    c.expect("DATA", "354").await;
                    c.send_raw(&dot_stuff_and_terminate(&body)).await;
                    let r = c.read_reply().await;
                    match r.code {
                        250 => ok.push(tag),
                        451 => {
                            assert_reply(&r, "451 4.3.0", "tempfail passthrough");
                            failed.push(tag)
                        }
                        _ => panic!("unexpected final reply {r:?}"),
                    }
                }
                c.expect("QUIT", "221 2.0.0").await;
                (ok, failed)
            }));
        }
        let mut ok = BTreeSet::new();
        let mut failed = BTreeSet::new();
        for t in tasks {
            let (o, f) = t.await.expect("session task");
            ok.extend(o);
            failed.extend(f);
        }
        assert_eq!(ok.len() + failed.len(), 32);
        assert!(failed.iter().all(|t| t.starts_with("tempfail-")));
        assert!(ok.iter().all(|t| t.starts_with("good-")));

        let mut delivered: Vec<String> = Vec::new();
        for m in mta.accepted() {
            let text = m.data_str();
            let subj = text
                .lines()
                .find_map(|l| l.strip_prefix("Subject: "))
                .unwrap_or("")
                .trim()
                .to_string();
            delivered.push(subj);
        }
        let delivered_set: BTreeSet<String> = delivered.iter().cloned().collect();
        assert_eq!(
            delivered.len(),
            delivered_set.len(),
            "duplicates delivered: {delivered:?}"
        );
        assert_eq!(delivered_set, ok, "delivered set differs from the 250 set");
        assert_next_hop_canonical(&mta);
    })
    .await
}

/// `[limits] message_memory` caps the message content all sessions hold together: with
/// one session holding most of it (content sent, final dot not yet; the gauge
/// `mailwarden_message_memory_bytes` shows when the proxy has read it), another session's
/// message is read to its end and answered `452 4.3.1`; that session stays usable, the
/// first message is delivered whole, and once it is, the second goes through on retry.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn message_memory_budget_defers_what_does_not_fit() {
    const STEP: f64 = 65536.0;
    bounded(async {
        let env = admin_common::start(admin_common::AdminOptions {
            limits: vec![
                "message_size_limit = 350000".into(),
                "message_memory = 700000".into(),
            ],
            ..Default::default()
        })
        .await;
        let line = format!("{}\r\n", "m".repeat(78));
        let big = |tag: &str, lines: usize| {
            let mut m = admin_common::message("p@accept.example", "u@example.org", tag, tag);
            m.extend_from_slice(line.repeat(lines).as_bytes());
            m
        };
        let reserved = || async {
            let text = env.get("/metrics").await.text();
            admin_common::metric(&text, "mailwarden_message_memory_bytes")
        };

        // A: 330 KB of content, no final dot yet: its buffer holds at least 6 of the 10
        // steps (the buffer grows by what arrives or a quarter: 6 to 8 steps).
        let first = big("first", 4100);
        let mut a = env.proxy.connect_ehlo(admin_common::HELO).await;
        a.expect("MAIL FROM:<p@accept.example>", "250").await;
        a.expect("RCPT TO:<u@example.org>", "250").await;
        a.expect("DATA", "354").await;
        let wire = dot_stuff_and_terminate(&first);
        let (body, end) = wire.split_at(wire.len() - 3);
        a.send_raw(body).await;
        // Wait until A has read all of it: its reservation covers the content and stops
        // growing.
        let mut held = 0.0;
        loop {
            tokio::time::sleep(Duration::from_millis(200)).await;
            let now = reserved().await;
            if now >= 6.0 * STEP && now == held {
                break;
            }
            held = now;
        }

        // B: 300 KB (at least 5 steps) does not fit in the 4 or fewer left.
        let second = big("second", 3750);
        let mut b = env.proxy.connect_ehlo(admin_common::HELO).await;
        let r = b
            .send_mail("p@accept.example", &["u@example.org"], &second)
            .await;
        assert_reply(&r, "452 4.3.1", "over the memory budget");
        b.expect("NOOP", "250").await;
        assert_eq!(reserved().await, held, "B's reservation given back");

        a.send_raw(end).await;
        let r = a.read_reply().await;
        assert_reply(&r, "250", "the message holding the budget");
        let r = b
            .send_mail("p@accept.example", &["u@example.org"], &second)
            .await;
        assert_reply(&r, "250", "retried once the budget is free");
        assert_eq!(reserved().await, 0.0, "everything given back");

        let msgs = env.mta.accepted();
        assert_eq!(msgs.len(), 2);
        for (got, sent) in msgs.iter().zip([&first, &second]) {
            let body = &sent[sent.len() - 1000..];
            assert!(
                got.data.ends_with(body) && got.data.len() >= sent.len(),
                "content at the next hop differs ({} vs {} bytes)",
                got.data.len(),
                sent.len()
            );
        }
        let log = env.proxy.log();
        assert!(log.contains("message memory budget"), "{log}");
    })
    .await
}

/// RELIABILITY L3: one message of exactly the size limit, then 20 at once (10 MB each,
/// checks off): each arrives at the next hop byte for byte, and the proxy's peak
/// resident memory grows by less than 2 × message size × concurrency.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn twenty_concurrent_ten_megabyte_messages() {
    const SIZE: usize = 10_240_000;
    const CONCURRENCY: usize = 20;
    bounded(async {
        let (mta, proxy) = setup_with(Script::default(), |mut o| {
            o.max_sessions_per_client = Some(CONCURRENCY as u32 + 1);
            o
        })
        .await;
        let (_, rss_start) = rss_kib(proxy.pid());
        let message = |n: usize| {
            let mut m = simple_message("a@x.example", "r@y.example", &format!("big {n}"), "");
            let line = format!("{n:04} {}\r\n", "0123456789".repeat(7));
            while m.len() + line.len() <= SIZE {
                m.extend_from_slice(line.as_bytes());
            }
            m.resize(SIZE - 2, b'x');
            m.extend_from_slice(b"\r\n");
            m
        };
        let send = |n: usize| {
            let addr = proxy.addr;
            async move {
                let m = message(n);
                let mut c = common::smtp_client::Client::connect(addr).await;
                c.read_reply().await;
                c.ehlo("big.example").await;
                let r = c.send_mail("a@x.example", &["r@y.example"], &m).await;
                assert_reply(&r, "250", &format!("10 MB message {n}"));
                assert_eq!(c.cmd("QUIT").await.code, 221);
                c.expect_eof().await;
                m
            }
        };
        let mut sent = vec![send(CONCURRENCY).await];
        let mut tasks = Vec::new();
        for n in 0..CONCURRENCY {
            tasks.push(tokio::spawn(send(n)));
        }
        for t in tasks {
            sent.push(t.await.expect("sender task"));
        }
        let (peak, _) = rss_kib(proxy.pid());
        let growth = peak.saturating_sub(rss_start) as usize * 1024;
        eprintln!(
            "L3: 1 + {CONCURRENCY} messages of {SIZE} bytes; proxy RSS {rss_start} KiB at start, \
             peak {peak} KiB: {:.2} × message size × concurrency",
            growth as f64 / (SIZE * CONCURRENCY) as f64
        );
        assert!(
            growth < 2 * SIZE * CONCURRENCY,
            "peak RSS grew by {growth} bytes"
        );
        let got = mta.accepted();
        assert_eq!(got.len(), sent.len());
        for m in &sent {
            let subject = &m[..200];
            let arrived = got
                .iter()
                .filter(|g| contains(&g.data, subject) && g.data.ends_with(m))
                .count();
            assert_eq!(
                arrived, 1,
                "a 10 MB message is not at the next hop exactly once"
            );
        }
    })
    .await
}
