//! SMTP replies: the one type every handler returns, rendered in one place.
//!
//! Replies relayed from the next hop are re-built from parsed parts (code, enhanced code,
//! sanitized text), never copied raw, so a hostile next hop cannot inject bytes into the
//! client's stream.

use std::fmt;
use std::io::Write as _;

/// An RFC 3463 enhanced status code, e.g. `5.7.1`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Enhanced(pub u8, pub u16, pub u16);

impl fmt::Display for Enhanced {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}.{}.{}", self.0, self.1, self.2)
    }
}

impl Enhanced {
    /// Parses `X.Y.Z` at the start of `text`, returning the code and the rest.
    fn split_from(text: &str) -> Option<(Enhanced, &str)> {
        let (word, rest) = text.split_once(' ').unwrap_or((text, ""));
        let mut parts = word.split('.');
        let class: u8 = parts.next()?.parse().ok()?;
        let subject: u16 = parts.next()?.parse().ok()?;
        let detail: u16 = parts.next()?.parse().ok()?;
        if parts.next().is_some() || !matches!(class, 2 | 4 | 5) || subject > 999 || detail > 999 {
            return None;
        }
        Some((Enhanced(class, subject, detail), rest))
    }
}

/// A complete SMTP reply: code, optional enhanced code, one or more text lines.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Reply {
    pub code: u16,
    pub enhanced: Option<Enhanced>,
    pub lines: Vec<String>,
}

impl Reply {
    /// A one-line reply with an enhanced status code.
    pub fn new(code: u16, enhanced: Enhanced, text: impl Into<String>) -> Reply {
        Reply {
            code,
            enhanced: Some(enhanced),
            lines: vec![text.into()],
        }
    }

    /// A reply without an enhanced code (greeting, EHLO, 354).
    pub fn plain(code: u16, lines: Vec<String>) -> Reply {
        Reply {
            code,
            enhanced: None,
            lines,
        }
    }

    pub fn is_positive(&self) -> bool {
        (200..400).contains(&self.code)
    }
    pub fn is_transient(&self) -> bool {
        (400..500).contains(&self.code)
    }
    pub fn is_permanent(&self) -> bool {
        self.code >= 500
    }
    /// 421 means the server is closing the connection.
    pub fn closes_session(&self) -> bool {
        self.code == 421
    }

    /// The first line of text (for logs).
    pub fn summary(&self) -> String {
        match (&self.enhanced, self.lines.first()) {
            (Some(e), Some(t)) => format!("{} {} {}", self.code, e, t),
            (None, Some(t)) => format!("{} {}", self.code, t),
            (Some(e), None) => format!("{} {}", self.code, e),
            (None, None) => self.code.to_string(),
        }
    }

    /// Appends the wire form (CRLF lines, `-` continuation) to `out`. Written straight
    /// into `out`: every reply of every session passes here, so no line is formatted
    /// into a string of its own first.
    pub fn write_to(&self, out: &mut Vec<u8>) {
        let last = self.lines.len().saturating_sub(1);
        let mut put = |i: usize, line: &str| {
            let sep = if i == last { b' ' } else { b'-' };
            let line = line.trim_end();
            // Writing into a Vec cannot fail.
            let _ = write!(out, "{}", self.code);
            out.push(sep);
            if let Some(e) = &self.enhanced {
                let _ = write!(out, "{e}");
                // A line with no text after the code is `250 2.0.0`, with no trailing space.
                if !line.is_empty() {
                    out.push(b' ');
                }
            }
            out.extend_from_slice(line.as_bytes());
            out.extend_from_slice(b"\r\n");
        };
        if self.lines.is_empty() {
            put(0, "");
        }
        for (i, line) in self.lines.iter().enumerate() {
            put(i, line);
        }
    }

    pub fn to_bytes(&self) -> Vec<u8> {
        let mut out = Vec::new();
        self.write_to(&mut out);
        out
    }

    /// Builds a reply from the lines of a multi-line reply read from the next hop.
    /// Each line is `DDD-text` or `DDD text`; all codes must agree. Returns `None` for
    /// anything else, which the relay treats as a protocol error.
    pub fn from_lines(raw: &[String]) -> Option<Reply> {
        let mut code = None;
        let mut enhanced = None;
        let mut lines = Vec::with_capacity(raw.len());
        for (i, line) in raw.iter().enumerate() {
            let (c, rest) = split_code(line)?;
            if *code.get_or_insert(c) != c {
                return None;
            }
            let mut text = rest;
            if let Some((e, after)) = Enhanced::split_from(rest)
                && e.0 as u16 == c / 100
            {
                if i == 0 {
                    enhanced = Some(e);
                }
                if enhanced == Some(e) {
                    text = after;
                }
            }
            lines.push(sanitize(text));
        }
        Some(Reply {
            code: code?,
            enhanced,
            lines,
        })
    }
}

/// Declares the fixed replies the proxy sends, one named constructor each, so every
/// handler says *which* reply it means and the codes and texts sit in one table.
macro_rules! fixed_replies {
    ($( $(#[$doc:meta])* $name:ident = $code:literal ($c:literal, $s:literal, $d:literal) $text:literal; )*) => {
        impl Reply {
            $(
                $(#[$doc])*
                pub fn $name() -> Reply {
                    Reply::new($code, Enhanced($c, $s, $d), $text)
                }
            )*
        }

        /// Every fixed reply by name, for the table's own tests.
        #[cfg(test)]
        pub(crate) const FIXED: &[(&str, fn() -> Reply)] = &[$((stringify!($name), Reply::$name)),*];
    };
}

fixed_replies! {
    // --- 2xx: accepted -------------------------------------------------------------
    /// RSET and NOOP.
    ok = 250 (2, 0, 0) "Ok";
    /// MAIL FROM accepted (RFC 3463 2.1.0: originator address status).
    sender_ok = 250 (2, 1, 0) "Ok";
    /// RCPT TO accepted (RFC 3463 2.1.5: destination address valid).
    recipient_ok = 250 (2, 1, 5) "Ok";
    /// STARTTLS: the TLS handshake may begin (RFC 3207 §4).
    ready_for_tls = 220 (2, 0, 0) "Ready to start TLS";
    /// QUIT.
    bye = 221 (2, 0, 0) "Bye";
    /// HELP.
    help = 214 (2, 0, 0) "See RFC 5321";
    /// VRFY: never confirms an address (RFC 5321 §3.5.3, no user enumeration).
    cannot_vrfy = 252 (2, 5, 0) "Cannot VRFY user, but will accept message and attempt delivery";
    /// AUTH accepted by the next hop (RFC 4954 §6).
    auth_succeeded = 235 (2, 7, 0) "Authentication successful";

    // --- 421: the session ends -----------------------------------------------------
    /// The global connection limit is reached.
    too_many_connections = 421 (4, 3, 2) "Too many connections, try again later";
    /// The per-address (or per-prefix) connection limit is reached.
    too_many_connections_from_address = 421 (4, 7, 0) "Too many connections from your address";
    /// `limits.max_transactions` per connection is reached.
    too_many_transactions = 421 (4, 7, 0) "Too many transactions, reconnect";
    /// Shutdown (drain) while the client is idle.
    shutting_down = 421 (4, 3, 0) "Server shutting down, try again later";
    /// The client was silent past the command or DATA timeout.
    timeout = 421 (4, 4, 2) "Timeout, closing connection";
    /// `limits.max_errors` per connection is reached.
    too_many_errors = 421 (4, 7, 0) "Too many errors, closing connection";

    // --- 45x: try again later ------------------------------------------------------
    /// `limits.max_recipients` per transaction is reached (RFC 5321 §4.5.3.1.10).
    too_many_recipients = 452 (4, 5, 3) "Too many recipients";
    /// A recipient whose policy differs from the transaction's first recipient.
    recipient_policy_differs = 452 (4, 5, 3) "Recipient policy differs, send to this recipient in a separate transaction";
    /// AUTH cannot be decided now (next hop unreachable or answered 4xx).
    temp_auth_failure = 454 (4, 7, 0) "Temporary authentication failure";
    /// AUTH would carry a password over a link that is not secured.
    no_secure_next_hop = 454 (4, 7, 0) "Temporary authentication failure: no secure link to the next hop";
    /// The next hop refused the connection or did not answer in time.
    next_hop_unavailable = 451 (4, 4, 1) "Next hop unavailable, try again later";
    /// The connection to the next hop broke or spoke nonsense.
    next_hop_failed = 451 (4, 4, 2) "Connection to next hop failed, try again later";
    /// Something local failed (policy, store, maildir); RFC 3463 4.3.0.
    temp_local_problem = 451 (4, 3, 0) "Temporary local problem, try again later";
    /// The message would exceed the session's memory budget (RFC 3463 4.3.1).
    insufficient_resources = 452 (4, 3, 1) "Insufficient system resources, try again later";
    /// The quarantine has no room (capacity or a sender domain's share).
    quarantine_full = 451 (4, 3, 1) "Insufficient system storage, try again later";
    /// The quarantine's disk is full or not writable.
    storage_full = 452 (4, 3, 1) "Insufficient system storage, try again later";
    /// Outbound: the account is over its deferral threshold.
    sending_rate_exceeded = 451 (4, 7, 1) "Sending rate exceeded, try again later";

    // --- 5xx: refused --------------------------------------------------------------
    /// A command line longer than RFC 5321 §4.5.3.1.4 allows.
    line_too_long = 500 (5, 5, 2) "Line too long";
    /// A command that cannot be parsed at all.
    syntax_error = 500 (5, 5, 2) "Syntax error";
    /// A SASL response line past the length limit.
    auth_line_too_long = 500 (5, 5, 6) "Authentication exchange line too long";
    /// A control byte (CR, LF, NUL …) inside a command.
    invalid_character = 501 (5, 5, 2) "Invalid character in command";
    /// A command that is not UTF-8.
    invalid_utf8 = 501 (5, 5, 2) "Invalid UTF-8 in command";
    /// A SASL response that is not base64.
    invalid_base64 = 501 (5, 5, 2) "Invalid base64 data";
    /// A PLAIN response that is not `authzid NUL authcid NUL passwd`.
    malformed_plain = 501 (5, 5, 2) "Malformed PLAIN response";
    /// The client sent `*` (RFC 4954 §4).
    auth_cancelled = 501 (5, 0, 0) "Authentication cancelled";
    /// MAIL FROM address that does not parse.
    bad_sender_syntax = 501 (5, 1, 7) "Bad sender address syntax";
    /// RCPT TO address that does not parse (or is empty).
    bad_recipient_syntax = 501 (5, 1, 3) "Bad recipient address syntax";
    /// A verb smtp-proto does not know.
    unknown_command = 502 (5, 5, 1) "Command not recognized";
    /// A known verb the proxy does not implement (ETRN, EXPN …).
    not_implemented = 502 (5, 5, 1) "Command not implemented";
    /// STARTTLS on a listener without a certificate, or after TLS.
    starttls_unavailable = 502 (5, 5, 1) "STARTTLS not available";
    /// MAIL before EHLO/HELO.
    need_helo = 503 (5, 5, 1) "Send EHLO/HELO first";
    /// AUTH before EHLO.
    need_ehlo = 503 (5, 5, 1) "Send EHLO first";
    /// MAIL inside a transaction.
    nested_mail = 503 (5, 5, 1) "Nested MAIL command";
    /// RCPT or DATA before MAIL.
    need_mail = 503 (5, 5, 1) "Need MAIL command";
    /// DATA before any RCPT was tried.
    need_rcpt = 503 (5, 5, 1) "Need RCPT command";
    /// AUTH after a successful AUTH (RFC 4954 §4).
    already_authenticated = 503 (5, 5, 1) "Already authenticated";
    /// AUTH between MAIL and the end of the transaction (RFC 4954 §4).
    auth_in_transaction = 503 (5, 5, 1) "AUTH not allowed inside a transaction";
    /// AUTH where EHLO did not offer it.
    auth_not_offered = 503 (5, 5, 1) "Authentication not offered";
    /// STARTTLS inside a transaction.
    starttls_in_transaction = 503 (5, 5, 1) "STARTTLS not allowed inside a transaction";
    /// BDAT: CHUNKING is not offered and the chunk would be read as commands.
    bdat_not_offered = 503 (5, 5, 1) "BDAT not offered, closing connection";
    /// MAIL with BODY=BINARYMIME (RFC 3030 needs CHUNKING).
    binarymime_not_offered = 504 (5, 5, 4) "BINARYMIME not offered";
    /// AUTH with a mechanism other than PLAIN or LOGIN.
    unknown_auth_mechanism = 504 (5, 5, 4) "Unrecognized authentication type";
    /// Submission without AUTH (RFC 6409 §4.3, RFC 4954 §6).
    auth_required = 530 (5, 7, 0) "Authentication required";
    /// The next hop refused the credentials.
    auth_invalid = 535 (5, 7, 8) "Authentication credentials invalid";
    /// AUTH over plain text (RFC 4954 §6, 538 5.7.11).
    encryption_required = 538 (5, 7, 11) "Encryption required for requested authentication mechanism";
    /// A recipient the inbound listener does not relay for.
    relay_denied = 550 (5, 7, 1) "Relay access denied";
    /// Outbound: a From address the account may not use.
    from_not_permitted = 550 (5, 7, 1) "From address not permitted for this account";
    /// Outbound: the account is over its rejection threshold.
    sending_limit_exceeded = 550 (5, 7, 1) "Sending limit exceeded for this account";
    /// SIZE or the message itself over `limits.message_size_limit` (RFC 1870).
    message_too_big = 552 (5, 3, 4) "Message size exceeds fixed limit";
    /// A non-ASCII address without SMTPUTF8 (RFC 6531 §3.2).
    needs_smtputf8 = 553 (5, 6, 7) "Non-ASCII address requires SMTPUTF8";
    /// Internationalized mail cannot go to a next hop without SMTPUTF8 (RFC 6531 §3.2).
    next_hop_lacks_smtputf8 = 553 (5, 6, 7) "Next hop does not support SMTPUTF8";
    /// DATA after every RCPT was refused (as Postfix).
    no_valid_recipients = 554 (5, 5, 1) "No valid recipients";
    /// A bare LF in the message while `limits.bare_lf = "reject"`.
    bare_lf_refused = 554 (5, 5, 2) "Bare <LF> line endings are not allowed (RFC 5321 section 2.3.8)";
    /// More Received headers than `limits.max_received_headers` (RFC 5321 §6.3).
    mail_loop = 554 (5, 4, 6) "Too many hops, mail loop detected";
    /// A DMARC report no destination took.
    every_destination_refused = 550 (5, 1, 1) "every destination refused";
}

/// The replies whose text has a variable part.
impl Reply {
    /// A message stored in the maildir target under `name`.
    pub fn stored_as(name: impl fmt::Display) -> Reply {
        Reply::new(250, Enhanced(2, 0, 0), format!("Ok: stored as {name}"))
    }

    /// A message committed to the quarantine as `id` (the client may forget it).
    pub fn queued(id: impl fmt::Display) -> Reply {
        Reply::new(250, Enhanced(2, 0, 0), format!("Ok: queued as {id}"))
    }

    /// A command with wrong arguments; `usage` is the expected form (`EHLO hostname`).
    pub fn syntax(usage: impl fmt::Display) -> Reply {
        Reply::new(501, Enhanced(5, 5, 4), format!("Syntax: {usage}"))
    }

    /// A MAIL/RCPT parameter whose value is invalid.
    pub fn invalid_parameter(param: impl fmt::Display) -> Reply {
        Reply::new(501, Enhanced(5, 5, 4), format!("Invalid parameter {param}"))
    }

    /// A MAIL/RCPT parameter the proxy does not offer; the client's text is sanitized.
    pub fn unsupported_parameter(param: &str) -> Reply {
        Reply::new(
            555,
            Enhanced(5, 5, 4),
            format!("Unsupported parameter {}", sanitize(param)),
        )
    }

    /// A policy rule's rejection, with the rule's reason as text.
    pub fn policy_reject(reason: impl Into<String>) -> Reply {
        Reply::new(550, Enhanced(5, 7, 1), reason)
    }

    /// A policy rule's deferral, with the rule's reason as text.
    pub fn policy_defer(reason: impl Into<String>) -> Reply {
        Reply::new(451, Enhanced(4, 7, 1), reason)
    }

    /// SPF fail at MAIL FROM (RFC 7372 5.7.23); the domain keeps printable ASCII only,
    /// because it comes from the client.
    pub fn spf_failed(domain: &str) -> Reply {
        Reply::new(
            550,
            Enhanced(5, 7, 23),
            format!(
                "SPF check failed for {}",
                domain.replace(|c: char| !c.is_ascii_graphic(), "")
            ),
        )
    }

    /// DATA accepted: send the message (RFC 5321 §4.2.2: 354 has no enhanced code).
    pub fn start_data() -> Reply {
        Reply::plain(354, vec!["End data with <CR><LF>.<CR><LF>".into()])
    }

    /// A SASL challenge (RFC 4954 §4), base64 text without an enhanced code.
    pub fn challenge(text: impl Into<String>) -> Reply {
        Reply::plain(334, vec![text.into()])
    }
}

/// Splits `DDD[ -]text` into the code and the text.
pub fn split_code(line: &str) -> Option<(u16, &str)> {
    let b = line.as_bytes();
    if b.len() < 3 || !b[..3].iter().all(u8::is_ascii_digit) {
        return None;
    }
    let code: u16 = line[..3].parse().ok()?;
    if !(200..=599).contains(&code) {
        return None;
    }
    match b.get(3) {
        None => Some((code, "")),
        Some(b' ') | Some(b'-') => Some((code, &line[4..])),
        _ => None,
    }
}

/// Whether a reply line ends a multi-line reply (`DDD ` or bare `DDD`).
pub fn is_last_line(line: &str) -> bool {
    line.as_bytes().get(3) != Some(&b'-')
}

/// Keeps printable ASCII only and bounds the length, so relayed text cannot carry
/// control bytes or terminal escapes to the client or into logs.
pub fn sanitize(text: &str) -> String {
    // One allocation: every kept character is one ASCII byte. Leading spaces are
    // skipped and trailing ones cut, as `trim` would (nothing else kept is whitespace).
    let mut out = String::with_capacity(text.len().min(400));
    for c in text.chars().take(400) {
        let c = if (' '..='~').contains(&c) { c } else { '?' };
        if c != ' ' || !out.is_empty() {
            out.push(c);
        }
    }
    out.truncate(out.trim_end_matches(' ').len());
    out
}

impl fmt::Display for Reply {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.summary())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn renders_multiline() {
        let r = Reply::plain(
            250,
            vec!["mx".into(), "PIPELINING".into(), "SIZE 10".into()],
        );
        assert_eq!(r.to_bytes(), b"250-mx\r\n250-PIPELINING\r\n250 SIZE 10\r\n");
        let r = Reply::new(550, Enhanced(5, 7, 1), "relay denied");
        assert_eq!(r.to_bytes(), b"550 5.7.1 relay denied\r\n");
    }

    #[test]
    fn parses_downstream_lines() {
        let r = Reply::from_lines(&["550-5.1.1 no such user".into(), "550 5.1.1 go away".into()])
            .unwrap();
        assert_eq!(r.code, 550);
        assert_eq!(r.enhanced, Some(Enhanced(5, 1, 1)));
        assert_eq!(r.lines, vec!["no such user", "go away"]);
        assert!(Reply::from_lines(&["250-a".into(), "251 b".into()]).is_none());
        assert!(Reply::from_lines(&["hello".into()]).is_none());
        assert!(Reply::from_lines(&["999 x".into()]).is_none());
        // An enhanced code whose class disagrees with the reply code is plain text.
        let r = Reply::from_lines(&["450 5.1.1 odd".into()]).unwrap();
        assert_eq!(r.enhanced, None);
    }

    /// `write_to` and `sanitize` write without intermediate strings; these compare them
    /// with the plain formatted versions they replaced, on awkward inputs.
    #[test]
    fn rendering_and_sanitizing_match_the_plain_versions() {
        fn formatted(r: &Reply) -> Vec<u8> {
            let mut out = Vec::new();
            let last = r.lines.len().saturating_sub(1);
            let empty = [String::new()];
            let lines = if r.lines.is_empty() {
                &empty[..]
            } else {
                &r.lines
            };
            for (i, line) in lines.iter().enumerate() {
                let sep = if i == last { ' ' } else { '-' };
                let text = match &r.enhanced {
                    Some(e) => format!("{e} {line}"),
                    None => line.clone(),
                };
                out.extend_from_slice(
                    format!("{}{}{}\r\n", r.code, sep, text.trim_end()).as_bytes(),
                );
            }
            out
        }
        fn trimmed(text: &str) -> String {
            let kept: String = text
                .chars()
                .map(|c| if (' '..='~').contains(&c) { c } else { '?' })
                .take(400)
                .collect();
            kept.trim().to_string()
        }
        let texts = [
            "",
            " ",
            "  ok  ",
            "a\tb ",
            "\t x",
            " \u{a0}é ",
            "x\u{3000}",
            "250 y",
            &"z ".repeat(300),
        ];
        for enhanced in [None, Some(Enhanced(2, 0, 0))] {
            for n in 0..3 {
                for t in texts {
                    let lines = (0..n).map(|i| format!("{t}{}", " ".repeat(i))).collect();
                    let r = Reply {
                        code: 250,
                        enhanced,
                        lines,
                    };
                    assert_eq!(r.to_bytes(), formatted(&r), "{r:?}");
                }
            }
        }
        for t in texts {
            assert_eq!(sanitize(t), trimmed(t), "{t:?}");
        }
    }

    #[test]
    fn sanitizes_text() {
        let r = Reply::from_lines(&["554 5.7.1 bad\x1b[31m \x00x".into()]).unwrap();
        assert_eq!(r.lines[0], "bad?[31m ?x");
    }

    #[test]
    fn fixed_replies_are_distinct_and_consistent() {
        let mut seen = std::collections::HashMap::new();
        for (name, make) in FIXED {
            let r = make();
            let e = r.enhanced.expect(name);
            // RFC 3463 §2: the enhanced code's class matches the reply code's first digit.
            assert_eq!(u16::from(e.0), r.code / 100, "{name}");
            assert_eq!(r.lines.len(), 1, "{name}");
            assert_eq!(
                r.lines[0],
                sanitize(&r.lines[0]),
                "{name}: text is sent as is"
            );
            let bytes = r.to_bytes();
            if let Some(other) = seen.insert(bytes, name) {
                panic!("{name} and {other} are the same reply");
            }
        }
        assert_eq!(
            Reply::need_mail().to_bytes(),
            b"503 5.5.1 Need MAIL command\r\n"
        );
        assert!(Reply::timeout().closes_session());
    }

    #[test]
    fn variable_replies_render_their_part() {
        assert_eq!(
            Reply::queued("01ABC").to_bytes(),
            b"250 2.0.0 Ok: queued as 01ABC\r\n"
        );
        assert_eq!(
            Reply::syntax("EHLO hostname").to_bytes(),
            b"501 5.5.4 Syntax: EHLO hostname\r\n"
        );
        // Client text cannot smuggle a line break or an escape into the reply.
        assert_eq!(
            Reply::unsupported_parameter("X=\r\n250 ok").to_bytes(),
            b"555 5.5.4 Unsupported parameter X=??250 ok\r\n"
        );
        assert_eq!(
            Reply::spf_failed("ex ample.org\r\n").to_bytes(),
            b"550 5.7.23 SPF check failed for example.org\r\n"
        );
        assert_eq!(Reply::challenge("").to_bytes(), b"334 \r\n");
        assert_eq!(
            Reply::start_data().to_bytes(),
            b"354 End data with <CR><LF>.<CR><LF>\r\n"
        );
    }
}
