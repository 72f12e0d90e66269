//! Next-hop failure modes (F1-F6): each maps to the contract's 4xx (or the next hop's own
//! code, passed through); the next hop never has a delivered copy of a message the client
//! did not get 250 for; and the client session stays usable: RSET and a new transaction
//! succeed once the next hop behaves again.

mod common;

use std::time::Duration;

use common::fake_mta::{Act, FakeMta, Script};
use common::smtp_client::{Client, assert_reply, simple_message};
use common::{Proxy, ProxyOptions, assert_next_hop_canonical, bounded, setup_with, show};

/// Where the failure surfaces on the client side.
#[derive(Clone, Copy, Debug, PartialEq)]
enum Stage {
    /// The first RCPT (which opens the next-hop transaction) gets the error.
    Rcpt,
    /// The reply to the end of data gets the error.
    EndOfData,
}

const FAULT_MARKER: &str = "fault-marker-7f3a";
const GOOD_MARKER: &str = "recovered-message-91c2";

/// Drive one failing transaction, then recover in the same session.
///
/// * `expected`: "CODE X.Y.Z" the client must see at `stage`.
/// * `content_may_arrive`: the failure happens after the content reached the next hop
///   (end-of-data failures), so only "not accepted" can be asserted, not "not received".
async fn fault_then_recover(
    mta: &FakeMta,
    proxy: &Proxy,
    stage: Stage,
    expected: &str,
    content_may_arrive: bool,
) -> Client {
    let mut c = proxy.connect_ehlo("client.example").await;
    c.expect("MAIL FROM:<sender@x.example>", "250 2.1.0").await;
    let r = c.cmd("RCPT TO:<rcpt@y.example>").await;
    match stage {
        Stage::Rcpt => {
            assert_reply(&r, expected, "RCPT with failing next hop");
            c.expect("DATA", "554 5.5.1").await;
        }
        Stage::EndOfData => {
            assert_eq!(r.code, 250, "RCPT: {r:?}");
            let body = simple_message("sender@x.example", "rcpt@y.example", FAULT_MARKER, "doomed");
            let fin = c.data(&body).await;
            assert_reply(&fin, expected, "end of data with failing next hop");
        }
    }

    // I1: nothing the client did not get 250 for was delivered.
    let leaked: Vec<_> = mta
        .accepted()
        .into_iter()
        .filter(|m| m.data_str().contains(FAULT_MARKER))
        .collect();
    assert!(
        leaked.is_empty(),
        "next hop accepted the failed message: {leaked:?}"
    );
    if !content_may_arrive {
        assert!(
            !mta.messages()
                .iter()
                .any(|m| m.data_str().contains(FAULT_MARKER)),
            "next hop received the content of the failed message"
        );
    }

    // The session stays usable.
    c.expect("RSET", "250 2.0.0").await;
    mta.set_script(Script::default());
    let body = simple_message(
        "sender@x.example",
        "rcpt@y.example",
        GOOD_MARKER,
        "fine now",
    );
    c.expect("MAIL FROM:<sender@x.example>", "250 2.1.0").await;
    c.expect("RCPT TO:<rcpt@y.example>", "250 2.1.5").await;
    let fin = c.data(&body).await;
    assert_eq!(
        fin.code,
        250,
        "recovery transaction: {fin:?}\nnext hop:\n{}",
        mta.transcripts_debug()
    );
    let good: Vec<_> = mta
        .accepted()
        .into_iter()
        .filter(|m| m.data_str().contains(GOOD_MARKER))
        .collect();
    assert_eq!(
        good.len(),
        1,
        "recovered message must be at the next hop exactly once"
    );
    assert!(good[0].data.ends_with(&body));
    assert_next_hop_canonical(mta);
    c.expect("QUIT", "221 2.0.0").await;
    c
}

async fn run_fault(script: Script, stage: Stage, expected: &str, content_may_arrive: bool) {
    run_fault_with(script, |o| o, stage, expected, content_may_arrive).await
}

async fn run_fault_with(
    script: Script,
    f: impl FnOnce(ProxyOptions) -> ProxyOptions,
    stage: Stage,
    expected: &str,
    content_may_arrive: bool,
) {
    let (mta, proxy) = setup_with(script, f).await;
    fault_then_recover(&mta, &proxy, stage, expected, content_may_arrive).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn next_hop_refuses_connection() {
    bounded(async {
        let addr = FakeMta::refused_addr();
        let proxy = Proxy::start(ProxyOptions::smtp(addr)).await;
        let mut c = proxy.connect_ehlo("client.example").await;
        c.expect("MAIL FROM:<sender@x.example>", "250 2.1.0").await;
        c.expect("RCPT TO:<rcpt@y.example>", "451 4.4.1").await;
        c.expect("DATA", "554 5.5.1").await;
        c.expect("RSET", "250 2.0.0").await;
        // The next hop comes up: the same session can now relay.
        let mta = FakeMta::start_at(addr, Script::default()).await;
        let body = simple_message("sender@x.example", "rcpt@y.example", GOOD_MARKER, "x");
        let fin = c
            .send_mail("sender@x.example", &["rcpt@y.example"], &body)
            .await;
        assert_eq!(fin.code, 250, "{fin:?}");
        assert_eq!(mta.accepted().len(), 1);
    })
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn next_hop_never_greets() {
    bounded(async {
        let s = Script {
            greeting: Act::Hang,
            ..Script::default()
        };
        run_fault_with(
            s,
            |o| o.next_hop_opt("greeting_timeout = \"2s\""),
            Stage::Rcpt,
            "451 4.4.2",
            false,
        )
        .await;
    })
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn next_hop_greets_with_garbage() {
    bounded(async {
        let s = Script {
            greeting: Act::raw(b"HELLO THERE this is not SMTP\r\n"),
            ..Script::default()
        };
        run_fault(s, Stage::Rcpt, "451 4.4.2", false).await;
    })
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn next_hop_4xx_at_mail_passed_to_rcpt() {
    bounded(async {
        let s = Script {
            mail: Act::reply("451 4.3.0 Mail server temporarily unavailable"),
            ..Script::default()
        };
        run_fault(s, Stage::Rcpt, "451 4.3.0", false).await;
    })
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn next_hop_5xx_at_mail_passed_to_rcpt() {
    bounded(async {
        let s = Script {
            mail: Act::reply("553 5.7.1 <sender@x.example>: Sender address rejected"),
            ..Script::default()
        };
        let (mta, proxy) = setup_with(s, |o| o).await;
        let mut c = proxy.connect_ehlo("client.example").await;
        c.expect("MAIL FROM:<sender@x.example>", "250 2.1.0").await;
        let r = c.cmd("RCPT TO:<rcpt@y.example>").await;
        assert_reply(&r, "553 5.7.1", "RCPT after next-hop MAIL rejection");
        assert!(r.text().contains("Sender address rejected"), "{r:?}");
        drop(c);
        drop(proxy);
        drop(mta);
    })
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn next_hop_4xx_at_rcpt() {
    bounded(async {
        let s = Script {
            rcpt: Act::reply("450 4.2.0 <rcpt@y.example>: Recipient address rejected: Greylisted"),
            ..Script::default()
        };
        run_fault(s, Stage::Rcpt, "450 4.2.0", false).await;
    })
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn next_hop_4xx_at_data_command() {
    bounded(async {
        let s = Script {
            data: Act::reply("451 4.3.0 Try again later"),
            ..Script::default()
        };
        run_fault(s, Stage::EndOfData, "451 4.3.0", false).await;
    })
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn next_hop_5xx_at_data_command() {
    bounded(async {
        let s = Script {
            data: Act::reply("550 5.7.0 Data refused"),
            ..Script::default()
        };
        run_fault(s, Stage::EndOfData, "550 5.7.0", false).await;
    })
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn next_hop_4xx_at_end_of_data() {
    bounded(async {
        let s = Script {
            eod: Act::reply("452 4.3.1 Insufficient system storage"),
            ..Script::default()
        };
        run_fault(s, Stage::EndOfData, "452 4.3.1", true).await;
    })
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn next_hop_5xx_at_end_of_data() {
    bounded(async {
        let s = Script {
            eod: Act::reply("554 5.7.1 Message rejected as spam"),
            ..Script::default()
        };
        run_fault(s, Stage::EndOfData, "554 5.7.1", true).await;
    })
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn next_hop_disconnects_mid_data() {
    bounded(async {
        let s = Script {
            disconnect_mid_data: true,
            ..Script::default()
        };
        run_fault(s, Stage::EndOfData, "451 4.4.2", false).await;
    })
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn next_hop_disconnects_at_data_command() {
    bounded(async {
        let s = Script {
            data: Act::Disconnect,
            ..Script::default()
        };
        run_fault(s, Stage::EndOfData, "451 4.4.2", false).await;
    })
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn next_hop_disconnects_after_end_of_data() {
    bounded(async {
        let s = Script {
            eod: Act::Disconnect,
            ..Script::default()
        };
        run_fault(s, Stage::EndOfData, "451 4.4.2", true).await;
    })
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn next_hop_disconnects_at_rcpt() {
    bounded(async {
        let s = Script {
            rcpt: Act::Disconnect,
            ..Script::default()
        };
        run_fault(s, Stage::Rcpt, "451 4.4.2", false).await;
    })
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn next_hop_garbage_reply_at_rcpt() {
    bounded(async {
        let s = Script {
            rcpt: Act::raw(b"what is this\r\n"),
            ..Script::default()
        };
        run_fault(s, Stage::Rcpt, "451 4.4.2", false).await;
    })
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn next_hop_garbage_reply_at_end_of_data() {
    bounded(async {
        let s = Script {
            eod: Act::raw(b"ok thanks bye\r\n"),
            ..Script::default()
        };
        run_fault(s, Stage::EndOfData, "451 4.4.2", true).await;
    })
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn next_hop_answers_250_to_data() {
    bounded(async {
        let s = Script {
            data: Act::reply("250 2.0.0 Ok"),
            ..Script::default()
        };
        let (mta, proxy) = setup_with(s, |o| o).await;
        fault_then_recover(&mta, &proxy, Stage::EndOfData, "451 4.4.2", false).await;
        // The body must never have been sent as commands to a next hop that is not in
        // DATA mode: no line of the failed message appears as a command.
        let cmds = mta.all_commands();
        assert!(
            !cmds.iter().any(|l| l.contains(FAULT_MARKER)),
            "message content sent while the next hop was in command mode:\n{}",
            mta.transcripts_debug()
        );
    })
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn next_hop_rcpt_timeout() {
    bounded(async {
        let s = Script {
            rcpt: Act::Hang,
            ..Script::default()
        };
        run_fault_with(
            s,
            |o| o.next_hop_opt("command_timeout = \"2s\""),
            Stage::Rcpt,
            "451 4.4.2",
            false,
        )
        .await;
    })
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn next_hop_end_of_data_timeout() {
    bounded(async {
        // The next hop answers only after mailwarden gave up: the client must get 4xx,
        // never 250. (If the next hop later accepts, that copy is the documented
        // duplicate case, so only the client side is asserted here.)
        let s = Script {
            eod: Act::delay(Duration::from_secs(8), Act::reply("250 2.0.0 late")),
            ..Script::default()
        };
        let (mta, proxy) = setup_with(s, |o| o.next_hop_opt("end_of_data_timeout = \"2s\"")).await;
        let mut c = proxy.connect_ehlo("client.example").await;
        c.expect("MAIL FROM:<sender@x.example>", "250 2.1.0").await;
        c.expect("RCPT TO:<rcpt@y.example>", "250").await;
        let body = simple_message("sender@x.example", "rcpt@y.example", FAULT_MARKER, "slow");
        let fin = c.data(&body).await;
        assert_reply(&fin, "451 4.4.2", "end of data timeout");
        c.expect("RSET", "250 2.0.0").await;
        mta.set_script(Script::default());
        let body2 = simple_message("sender@x.example", "rcpt@y.example", GOOD_MARKER, "x");
        let fin2 = c
            .send_mail("sender@x.example", &["rcpt@y.example"], &body2)
            .await;
        assert_eq!(fin2.code, 250, "{fin2:?}");
        let good = mta
            .accepted()
            .into_iter()
            .filter(|m| m.data_str().contains(GOOD_MARKER))
            .count();
        assert_eq!(good, 1);
    })
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn next_hop_fails_then_each_new_transaction_retries() {
    bounded(async {
        // A next hop that greets with 421 (going away) twice in a row: every attempt
        // gets a 4xx, never a 2xx, and the session keeps working.
        let s = Script {
            greeting: Act::reply("421 4.3.2 Service shutting down"),
            ..Script::default()
        };
        let (mta, proxy) = setup_with(s, |o| o).await;
        let mut c = proxy.connect_ehlo("client.example").await;
        for _ in 0..2 {
            c.expect("MAIL FROM:<sender@x.example>", "250 2.1.0").await;
            let r = c.cmd("RCPT TO:<rcpt@y.example>").await;
            assert_eq!(r.code / 100, 4, "RCPT with a 421-greeting next hop: {r:?}");
            c.expect("RSET", "250 2.0.0").await;
        }
        assert!(mta.messages().is_empty());
        assert!(
            mta.connection_count() >= 2,
            "each transaction should try the next hop again"
        );
        mta.set_script(Script::default());
        let body = simple_message("sender@x.example", "rcpt@y.example", GOOD_MARKER, "x");
        let fin = c
            .send_mail("sender@x.example", &["rcpt@y.example"], &body)
            .await;
        assert_eq!(fin.code, 250, "{fin:?}: {}", show(&fin.raw));
    })
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn next_hop_refuses_xclient_never_relays() {
    bounded(async {
        // xclient = "require": a next hop that refuses XCLIENT would see mailwarden's
        // address instead of the client's (I2), so nothing may be relayed through it.
        let s = Script {
            xclient: Act::reply("550 5.7.0 Error: insufficient authorization"),
            ..Script::default()
        };
        let (mta, proxy) = setup_with(s, |o| o).await;
        let mut c = proxy.connect_ehlo("client.example").await;
        c.expect("MAIL FROM:<sender@x.example>", "250 2.1.0").await;
        let r = c.cmd("RCPT TO:<rcpt@y.example>").await;
        assert_eq!(
            r.code / 100,
            4,
            "RCPT when the next hop refuses XCLIENT: {r:?}"
        );
        assert!(
            !mta.all_commands()
                .iter()
                .any(|l| l.to_ascii_uppercase().starts_with("MAIL")),
            "relayed without XCLIENT:\n{}",
            mta.transcripts_debug()
        );
        c.expect("DATA", "554 5.5.1").await;
    })
    .await
}

/// The next hop closes a connection the proxy keeps between transactions (Postfix's idle
/// timeout: an unsolicited `421 4.4.2 … timeout exceeded`, then close). The session's next
/// transaction is not failed for it: MAIL has changed nothing yet, so the proxy opens a
/// fresh connection and every message goes through, one next-hop connection each.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idle_connection_closed_by_the_next_hop_is_reopened() {
    bounded(async {
        let script = Script {
            eod: Act::raw(
                b"250 2.0.0 Ok: queued\r\n421 4.4.2 fake.test Error: timeout exceeded\r\n",
            ),
            ..Script::default()
        };
        let (mta, proxy) = setup_with(script, |o| o).await;
        let mut c = proxy.connect_ehlo("client.example").await;
        for n in 0..3 {
            let body = simple_message("s@x.example", "r@y.example", &format!("idle {n}"), "x");
            let r = c.send_mail("s@x.example", &["r@y.example"], &body).await;
            assert_reply(&r, "250", &format!("transaction {n}"));
        }
        assert_eq!(mta.messages().len(), 3);
        assert_eq!(
            mta.conns().len(),
            3,
            "a fresh next-hop connection per transaction"
        );
        assert_next_hop_canonical(&mta);
    })
    .await
}
