//! Next-hop failure modes (F1-F6), as one table ([`faults`]) run by one loop: each row is
//! a fault the fake next hop injects, the phase where the client sees it, the reply it
//! must see (the contract's 4xx, or the next hop's own code passed through) and the
//! warning the proxy must log (or not log: a reply the next hop chose is no failure of
//! ours). For every row the next hop never has a delivered copy of a message the client
//! did not get 250 for, no line of the message ever reaches it as a command, and the
//! client session stays usable: RSET and a new transaction succeed once the next hop
//! behaves again.
//!
//! A next hop closing an idle connection is no fault the client sees (every message goes
//! through), so it is a test of its own below the table.

mod common;

use std::time::Duration;

use common::fake_mta::{Act, FakeMta, Script};
use common::smtp_client::{assert_reply, simple_message};
use common::{Proxy, ProxyOptions, assert_next_hop_canonical, bounded, setup_with, show};

/// Where the failure surfaces on the client side.
#[derive(Clone, Copy, Debug, PartialEq)]
enum Phase {
    /// The first RCPT (which opens the next-hop transaction) gets the error.
    Rcpt,
    /// The reply to the end of data gets the error.
    EndOfData,
}

/// What the next hop may hold of the failed message afterwards.
#[derive(Clone, Copy, Debug, PartialEq)]
enum Leftover {
    /// Not even its content arrived (the failure came before the content).
    Nothing,
    /// The content may have arrived (failures after it), but it was never accepted.
    NotAccepted,
    /// The next hop may still accept it after we gave up (a final reply that comes too
    /// late): the documented duplicate case, so only the client's side is asserted.
    MaybeLater,
}

/// What the fake next hop does wrong.
enum Fault {
    /// Nothing listens at the next hop's address until the recovery.
    NotListening,
    /// The fake next hop follows this script until the recovery.
    Script(Box<Script>),
}

/// A check of the next hop's commands particular to one row.
#[derive(Clone, Copy, Debug, PartialEq)]
enum Extra {
    None,
    /// Each failing transaction tried a new next-hop connection.
    EachTransactionReconnects,
    /// The next hop never received MAIL (the transaction was refused before it).
    NoMail,
}

/// One row of [`faults`]: a fault, where the client sees it, what it sees and what the
/// proxy logs about it.
struct Row {
    name: &'static str,
    fault: Fault,
    /// `key = value` lines for `[next_hop]` (short timeouts for the hanging faults).
    next_hop: &'static [&'static str],
    phase: Phase,
    /// "CODE X.Y.Z text" (the text is a substring), or "4xx" for any temporary failure.
    reply: &'static str,
    leftover: Leftover,
    /// The proxy's warning about the failure: `next hop failed at WHERE`, with an error
    /// that contains the second part; `None`: a reply the next hop chose, passed
    /// through, is no failure of ours and must not be logged as one.
    log: Option<(&'static str, &'static str)>,
    /// Failing transactions before the recovery (each must fail the same way).
    attempts: usize,
    extra: Extra,
}

/// A next hop that offers CHUNKING (the message goes as BDAT), edited by `edit`.
fn chunking(edit: impl FnOnce(&mut Script)) -> Fault {
    script(|s| {
        s.caps.push("CHUNKING".into());
        edit(s);
    })
}

fn script(edit: impl FnOnce(&mut Script)) -> Fault {
    let mut s = Script::default();
    edit(&mut s);
    Fault::Script(Box::new(s))
}

/// Every next-hop fault (F1-F6) and what the client and the log must show.
fn faults() -> Vec<Row> {
    use Leftover::{MaybeLater, NotAccepted, Nothing};
    use Phase::{EndOfData, Rcpt};
    let row = |name, fault, phase, reply, leftover, log| Row {
        name,
        fault,
        next_hop: &[],
        phase,
        reply,
        leftover,
        log,
        attempts: 1,
        extra: Extra::None,
    };
    vec![
        row(
            "refuses connection",
            Fault::NotListening,
            Rcpt,
            "451 4.4.1",
            Nothing,
            Some(("MAIL", "downstream connect refused")),
        ),
        Row {
            next_hop: &["greeting_timeout = \"2s\""],
            ..row(
                "never greets",
                script(|s| s.greeting = Act::Hang),
                Rcpt,
                "451 4.4.2",
                Nothing,
                Some(("MAIL", "downstream timed out waiting for reply")),
            )
        },
        row(
            "greets with garbage",
            script(|s| s.greeting = Act::raw(b"HELLO THERE this is not SMTP\r\n")),
            Rcpt,
            "451 4.4.2",
            Nothing,
            Some(("MAIL", "downstream protocol error")),
        ),
        Row {
            attempts: 2,
            extra: Extra::EachTransactionReconnects,
            ..row(
                "greets with 421, twice",
                script(|s| s.greeting = Act::reply("421 4.3.2 Service shutting down")),
                Rcpt,
                "4xx",
                Nothing,
                Some(("MAIL", "downstream refused the session")),
            )
        },
        Row {
            extra: Extra::NoMail,
            ..row(
                "refuses XCLIENT",
                script(|s| s.xclient = Act::reply("550 5.7.0 Error: insufficient authorization")),
                Rcpt,
                "4xx",
                Nothing,
                Some(("MAIL", "")),
            )
        },
        row(
            "4xx at MAIL",
            script(|s| s.mail = Act::reply("451 4.3.0 Mail server temporarily unavailable")),
            Rcpt,
            "451 4.3.0",
            Nothing,
            None,
        ),
        row(
            "5xx at MAIL",
            script(|s| {
                s.mail = Act::reply("553 5.7.1 <sender@x.example>: Sender address rejected")
            }),
            Rcpt,
            "553 5.7.1 Sender address rejected",
            Nothing,
            None,
        ),
        row(
            "4xx at RCPT",
            script(|s| {
                s.rcpt =
                    Act::reply("450 4.2.0 <rcpt@y.example>: Recipient address rejected: Greylisted")
            }),
            Rcpt,
            "450 4.2.0",
            Nothing,
            None,
        ),
        row(
            "disconnects at RCPT",
            script(|s| s.rcpt = Act::Disconnect),
            Rcpt,
            "451 4.4.2",
            Nothing,
            Some(("RCPT", "downstream closed the connection")),
        ),
        row(
            "garbage reply at RCPT",
            script(|s| s.rcpt = Act::raw(b"what is this\r\n")),
            Rcpt,
            "451 4.4.2",
            Nothing,
            Some(("RCPT", "downstream protocol error")),
        ),
        Row {
            next_hop: &["command_timeout = \"2s\""],
            ..row(
                "RCPT timeout",
                script(|s| s.rcpt = Act::Hang),
                Rcpt,
                "451 4.4.2",
                Nothing,
                Some(("RCPT", "downstream timed out waiting for reply")),
            )
        },
        row(
            "4xx at DATA",
            script(|s| s.data = Act::reply("451 4.3.0 Try again later")),
            EndOfData,
            "451 4.3.0",
            Nothing,
            None,
        ),
        row(
            "5xx at DATA",
            script(|s| s.data = Act::reply("550 5.7.0 Data refused")),
            EndOfData,
            "550 5.7.0",
            Nothing,
            None,
        ),
        // The body must never be sent as commands to a next hop that is not in DATA
        // mode (checked for every row: no line of the failed message is a command).
        row(
            "250 to DATA",
            script(|s| s.data = Act::reply("250 2.0.0 Ok")),
            EndOfData,
            "451 4.4.2",
            Nothing,
            Some(("end of data", "downstream protocol error")),
        ),
        row(
            "disconnects at DATA",
            script(|s| s.data = Act::Disconnect),
            EndOfData,
            "451 4.4.2",
            Nothing,
            Some(("end of data", "downstream closed the connection")),
        ),
        row(
            "disconnects mid data",
            script(|s| s.disconnect_mid_data = true),
            EndOfData,
            "451 4.4.2",
            Nothing,
            Some(("end of data", "")),
        ),
        row(
            "4xx at end of data",
            script(|s| s.eod = Act::reply("452 4.3.1 Insufficient system storage")),
            EndOfData,
            "452 4.3.1",
            NotAccepted,
            None,
        ),
        row(
            "5xx at end of data",
            script(|s| s.eod = Act::reply("554 5.7.1 Message rejected as spam")),
            EndOfData,
            "554 5.7.1",
            NotAccepted,
            None,
        ),
        row(
            "disconnects after end of data",
            script(|s| s.eod = Act::Disconnect),
            EndOfData,
            "451 4.4.2",
            NotAccepted,
            Some(("end of data", "no reply after the end of data")),
        ),
        row(
            "garbage reply at end of data",
            script(|s| s.eod = Act::raw(b"ok thanks bye\r\n")),
            EndOfData,
            "451 4.4.2",
            NotAccepted,
            Some(("end of data", "no reply after the end of data")),
        ),
        // A next hop with CHUNKING gets the message as one `BDAT <size> LAST`: the same
        // faults end the same way (the chunk's answer is the end of data's).
        row(
            "BDAT: disconnects mid chunk",
            chunking(|s| s.disconnect_mid_data = true),
            EndOfData,
            "451 4.4.2",
            Nothing,
            Some(("end of data", "")),
        ),
        row(
            "BDAT: 4xx to the chunk",
            chunking(|s| s.eod = Act::reply("452 4.3.1 Insufficient system storage")),
            EndOfData,
            "452 4.3.1",
            NotAccepted,
            None,
        ),
        row(
            "BDAT: 5xx to the chunk",
            chunking(|s| s.eod = Act::reply("554 5.7.1 Message rejected as spam")),
            EndOfData,
            "554 5.7.1",
            NotAccepted,
            None,
        ),
        row(
            "BDAT: disconnects after the chunk",
            chunking(|s| s.eod = Act::Disconnect),
            EndOfData,
            "451 4.4.2",
            NotAccepted,
            Some(("end of data", "no reply after the end of data")),
        ),
        // The next hop answers only after we gave up: the client gets 4xx, never 250.
        Row {
            next_hop: &["end_of_data_timeout = \"2s\""],
            ..row(
                "end of data timeout",
                script(|s| {
                    s.eod = Act::delay(Duration::from_secs(8), Act::reply("250 2.0.0 late"))
                }),
                EndOfData,
                "451 4.4.2",
                MaybeLater,
                Some(("end of data", "no reply after the end of data")),
            )
        },
    ]
}

const FAULT_MARKER: &str = "fault-marker-7f3a";
const GOOD_MARKER: &str = "recovered-message-91c2";

/// Whether a reply is what a row expects.
fn expect_reply(reply: &common::smtp_client::Reply, want: &str, what: &str) {
    if want == "4xx" {
        assert_eq!(reply.code / 100, 4, "{what}: {}", show(&reply.raw));
        return;
    }
    let mut words = want.splitn(3, ' ');
    let code_and_enhanced = format!(
        "{} {}",
        words.next().unwrap_or(""),
        words.next().unwrap_or("")
    );
    assert_reply(reply, code_and_enhanced.trim(), what);
    if let Some(text) = words.next() {
        assert!(
            reply.full_text().contains(text),
            "{what}: {}",
            show(&reply.raw)
        );
    }
}

/// Drives one row: the failing transaction(s), the checks, then a recovery in the same
/// session once the next hop behaves again (RSET and a new transaction succeed).
async fn run_row(row: Row) {
    let (addr, mta) = match &row.fault {
        Fault::NotListening => (FakeMta::refused_addr(), None),
        Fault::Script(s) => {
            let mta = FakeMta::start(Script::clone(s)).await;
            (mta.addr, Some(mta))
        }
    };
    let mut options = ProxyOptions::smtp(addr);
    for line in row.next_hop {
        options = options.next_hop_opt(line);
    }
    let proxy = Proxy::start(options).await;
    let mut c = proxy.connect_ehlo("client.example").await;
    for attempt in 0..row.attempts {
        let what = format!("{} (attempt {})", row.name, attempt + 1);
        c.expect("MAIL FROM:<sender@x.example>", "250 2.1.0").await;
        let r = c.cmd("RCPT TO:<rcpt@y.example>").await;
        match row.phase {
            Phase::Rcpt => {
                expect_reply(&r, row.reply, &format!("{what}: RCPT"));
                c.expect("DATA", "554 5.5.1").await;
            }
            Phase::EndOfData => {
                assert_eq!(r.code, 250, "{what}: RCPT: {r:?}");
                let body =
                    simple_message("sender@x.example", "rcpt@y.example", FAULT_MARKER, "doomed");
                let fin = c.data(&body).await;
                expect_reply(&fin, row.reply, &format!("{what}: end of data"));
            }
        }
        c.expect("RSET", "250 2.0.0").await;
    }
    if let Some(mta) = &mta {
        check_next_hop_after_fault(&row, mta);
    }
    check_log(&row, &proxy.log());

    // The next hop behaves again: the same session relays.
    let mta = match mta {
        Some(mta) => {
            mta.set_script(Script::default());
            mta
        }
        None => FakeMta::start_at(addr, Script::default()).await,
    };
    let body = simple_message(
        "sender@x.example",
        "rcpt@y.example",
        GOOD_MARKER,
        "fine now",
    );
    let fin = c
        .send_mail("sender@x.example", &["rcpt@y.example"], &body)
        .await;
    assert_eq!(
        fin.code,
        250,
        "{}: recovery: {fin:?}\nnext hop:\n{}",
        row.name,
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
        "{}: the recovered message must be at the next hop exactly once",
        row.name
    );
    assert!(good[0].data.ends_with(&body), "{}", row.name);
    assert_next_hop_canonical(&mta);
    c.expect("QUIT", "221 2.0.0").await;
}

/// I1: nothing the client did not get 250 for was delivered; and the row's own check.
fn check_next_hop_after_fault(row: &Row, mta: &FakeMta) {
    let name = row.name;
    if let Fault::Script(s) = &row.fault
        && s.caps.iter().any(|c| c == "CHUNKING")
    {
        let verbs = mta.all_commands();
        assert!(
            verbs.iter().any(|c| c.starts_with("BDAT ")) && !verbs.iter().any(|c| c == "DATA"),
            "{name}: CHUNKING offered, the message must go as BDAT: {verbs:?}"
        );
    }
    if row.leftover != Leftover::MaybeLater {
        let leaked: Vec<_> = mta
            .accepted()
            .into_iter()
            .filter(|m| m.data_str().contains(FAULT_MARKER))
            .collect();
        assert!(
            leaked.is_empty(),
            "{name}: the next hop accepted the failed message: {leaked:?}"
        );
    }
    if row.leftover == Leftover::Nothing {
        assert!(
            !mta.messages()
                .iter()
                .any(|m| m.data_str().contains(FAULT_MARKER)),
            "{name}: the next hop received the content of the failed message"
        );
    }
    let commands = mta.all_commands();
    assert!(
        !commands.iter().any(|l| l.contains(FAULT_MARKER)),
        "{name}: message content sent as commands:\n{}",
        mta.transcripts_debug()
    );
    match row.extra {
        Extra::None => {}
        Extra::EachTransactionReconnects => assert!(
            mta.connection_count() >= row.attempts,
            "{name}: each transaction should try the next hop again"
        ),
        Extra::NoMail => assert!(
            !commands
                .iter()
                .any(|l| l.to_ascii_uppercase().starts_with("MAIL")),
            "{name}: relayed anyway:\n{}",
            mta.transcripts_debug()
        ),
    }
}

/// The proxy's log names a failure of ours, and stays quiet about a reply the next hop
/// chose (passed through to the client).
fn check_log(row: &Row, log: &str) {
    match row.log {
        Some((at, error)) => {
            let what = format!("next hop failed at {at}");
            assert!(
                log.lines()
                    .any(|l| l.contains("WARN") && l.contains(&what) && l.contains(error)),
                "{}: no warning {what:?} with an error containing {error:?} in the log:\n{log}",
                row.name
            )
        }
        None => assert!(
            !log.contains("next hop failed"),
            "{}: a reply of the next hop's own logged as a failure:\n{log}",
            row.name
        ),
    }
}

/// One loop over [`faults`]: each row runs in a task of its own, so one failing row
/// names itself and the others still run.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn next_hop_faults() {
    bounded(async {
        let mut failed = Vec::new();
        let rows = faults();
        let count = rows.len();
        for row in rows {
            let name = row.name;
            if let Err(e) = tokio::spawn(run_row(row)).await {
                failed.push(format!("{name}: {e}"));
            }
        }
        assert!(
            failed.is_empty(),
            "{} of {count} rows failed:\n{}",
            failed.len(),
            failed.join("\n")
        );
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
