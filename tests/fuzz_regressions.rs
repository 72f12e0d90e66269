//! Bugs found by the fuzz targets (fuzz/README.md), each reduced to the smallest input
//! that shows it. Unfixed ones are `#[ignore]`d with the reason, so `cargo test` stays
//! green and `cargo test --test fuzz_regressions -- --ignored` shows them failing; when a
//! bug is fixed, drop its `#[ignore]` and the matching KNOWN BUG skip in
//! src/fuzzing/.

use mailwarden::relay::client::{Capabilities, mail_command, rcpt_command};
use mailwarden::relay::writer;
use mailwarden::wire::codec::{DataReader, canonicalize};
use mailwarden::wire::command;
use smtp_proto::Request;

fn all_caps() -> Capabilities {
    Capabilities {
        size: Some(0),
        eight_bit_mime: true,
        smtputf8: true,
        dsn: true,
        ..Capabilities::default()
    }
}

/// How the next hop (smtp-proto standing in for it) reads a command we send.
fn next_hop(line: &str) -> Result<Request<String>, smtp_proto::Error> {
    Request::parse(&mut line.as_bytes().iter()).map(|r| r.into_owned())
}

/// smtp_commands, within a minute. smtp-proto removes the quotes of a quoted local part and
/// `mail_command` / `rcpt_command` put the address back between `<>` as it is: the next
/// hop reads a different address, followed by parameters of the client's choosing. Here
/// the proxy checks SPF and DMARC for attacker.example while the next hop accepts mail
/// from ceo@bank.example (ENVID is valid xtext, so a DSN-capable next hop takes it); the
/// same shape in RCPT TO gets a remote recipient past the local-domain check.
#[test]
fn quoted_local_part_reaches_the_next_hop_unquoted() {
    let Ok(Request::Mail { from }) =
        command::parse(b"MAIL FROM:<\"ceo@bank.example> ENVID=\"@attacker.example>\r\n")
    else {
        panic!("the client's command parses");
    };
    assert_eq!(from.address, "ceo@bank.example> ENVID=@attacker.example");
    let line = mail_command(&from, &all_caps(), 0);
    let Ok(Request::Mail { from: seen }) = next_hop(&line) else {
        panic!("{line:?} does not parse");
    };
    assert_eq!(seen.address, from.address, "the next hop reads {line:?}");

    let Ok(Request::Rcpt { to }) =
        command::parse(b"RCPT TO:<\"victim@remote.example> ORCPT=rfc822;\"@example.org>\r\n")
    else {
        panic!("the client's command parses");
    };
    assert!(to.address.ends_with("@example.org"), "local for the proxy");
    let line = rcpt_command(&to, &all_caps());
    let Ok(Request::Rcpt { to: seen }) = next_hop(&line) else {
        panic!("{line:?} does not parse");
    };
    assert_eq!(seen.address, to.address, "the next hop reads {line:?}");
}

/// smtp_commands, in the 10-minute run. smtp-proto also takes quoted text after the `@`
/// and drops the quotes, so `a@bank.example"> RET=FULL x"` was the address, and the
/// proxy put `<a@bank.example> RET=FULL x>` on the next hop's MAIL line: the proxy
/// checked SPF for a domain that does not exist while the next hop read another sender
/// and a parameter of the client's choosing (on a submission listener, the same in RCPT
/// TO). Fixed: the domain must be a domain name (smtp-proto already refuses address
/// literals), else 501.
#[test]
fn quoted_text_in_the_domain_is_refused() {
    for line in [
        &b"MAIL FROM:<a@bank.example\"> RET=FULL x\">\r\n"[..],
        b"RCPT TO:<a@example.org\"> NOTIFY=NEVER x\">\r\n",
        b"MAIL FROM:<a@b.example\"..  ol::MEj SMTPU\"\"le>\r\n",
        b"RCPT TO:<a@[1.2.3.4] x>\r\n",
        b"RCPT TO:<x@\"evil@example.org\">\r\n",
        b"MAIL FROM:<\"a\"@b.example\"\">\r\n",
    ] {
        let reply = command::parse(line).expect_err(&String::from_utf8_lossy(line));
        assert_eq!(reply.code, 501, "{}", String::from_utf8_lossy(line));
    }
    for line in [
        &b"RCPT TO:<postmaster>\r\n"[..],
        b"RCPT TO:<\"a@b\"@example.org>\r\n",
        b"RCPT TO:<\"a\\\"@b\"@example.org>\r\n",
        b"MAIL FROM:<a@example.org.>\r\n",
        b"MAIL FROM:<a@mail_relay.example>\r\n",
    ] {
        let Ok(cmd) = command::parse(line) else {
            panic!("{} is refused", String::from_utf8_lossy(line));
        };
        let (address, rebuilt) = match cmd {
            Request::Mail { from } => (from.address.clone(), mail_command(&from, &all_caps(), 0)),
            Request::Rcpt { to } => (to.address.clone(), rcpt_command(&to, &all_caps())),
            other => panic!("not MAIL or RCPT: {other:?}"),
        };
        if address.eq_ignore_ascii_case("postmaster") {
            // smtp-proto (the model of a next hop here) reads `<postmaster>` as an empty
            // path; real MTAs take it (RFC 5321 §4.5.1), so the line itself is checked.
            assert_eq!(rebuilt.trim_end(), "RCPT TO:<postmaster>");
            continue;
        }
        let seen = match next_hop(&rebuilt) {
            Ok(Request::Mail { from }) => from.address,
            Ok(Request::Rcpt { to }) => to.address,
            other => panic!("{rebuilt:?} reads as {other:?}"),
        };
        assert_eq!(seen, address, "the next hop reads {rebuilt:?}");
    }
}

/// smtp_commands, first seconds. smtp-proto accepts raw non-ASCII bytes in ENVID (and in
/// ORCPT), turns them into U+FFFD, and the proxy re-encodes that as xtext: 12 raw octets
/// become 108 characters, past RFC 3461's 100, so the next hop refuses the MAIL command
/// (and the value has changed anyway). Such a parameter should get a 501 at the proxy.
#[test]
fn non_ascii_envid_and_orcpt_are_forwarded_mangled() {
    let mut mail = b"MAIL FROM:<> ENVID=".to_vec();
    mail.extend_from_slice(&[0xFF; 12]);
    mail.extend_from_slice(b"\r\n");
    if let Ok(Request::Mail { from }) = command::parse(&mail) {
        let line = mail_command(&from, &all_caps(), 0);
        assert!(next_hop(&line).is_ok(), "the next hop refuses {line:?}");
    }
    let mut rcpt = b"RCPT TO:<b@y.example> ORCPT=rfc822;b@y.example".to_vec();
    rcpt.extend_from_slice(&[0xFF; 60]);
    rcpt.extend_from_slice(b"\r\n");
    if let Ok(Request::Rcpt { to }) = command::parse(&rcpt) {
        let line = rcpt_command(&to, &all_caps());
        assert!(next_hop(&line).is_ok(), "the next hop refuses {line:?}");
    }
}

/// message_verification, under 20 seconds. A message whose first line starts with a space
/// or tab continues the last header field the proxy puts on top (for an accepted message,
/// its own `Authentication-Results`): the sender appends results to our verdict.
#[test]
fn leading_whitespace_line_folds_into_our_header() {
    let message = b" dkim=pass header.d=bank.example\r\nSubject: hi\r\n\r\nbody\r\n";
    let ours = "Authentication-Results: mx.example.org; spf=fail smtp.mailfrom=bank.example";
    let encoded = writer::encode_parts(&[ours.to_string()], &[message]);
    let mut received = Vec::new();
    let (_, done) = DataReader::new(usize::MAX).ingest(&encoded, &mut received);
    assert!(done);
    let fields = mailwarden::auth::headers::fields(&received);
    assert_eq!(
        fields[0].value, "mx.example.org; spf=fail smtp.mailfrom=bank.example",
        "the next hop reads our header as {:?}",
        fields[0].value
    );
}

/// message_verification. `canonicalize` (the `check` command) takes a CR at the very end
/// of a file for a line ending, where the DATA reader (and the relay writer) make a stray
/// CR a space: `check` verifies "x\r\n" when the proxy would have verified "x \r\n".
#[test]
fn canonicalize_treats_a_final_bare_cr_as_a_line_end() {
    let file = b"x\r";
    let mut wire = file.to_vec();
    wire.extend_from_slice(b"\r\n.\r\n");
    let mut out = Vec::new();
    let (_, done) = DataReader::new(usize::MAX).ingest(&wire, &mut out);
    assert!(done);
    assert_eq!(canonicalize(file), out);
}
