//! Turning one client line into a typed command, or into the reply explaining why not.
//!
//! smtp-proto does the grammar; this adds what a proxy must also refuse: NUL and bare CR
//! anywhere in a command (they would end up in commands or headers built downstream),
//! and the commands a client must never get through to the next hop (XCLIENT, XFORWARD).

use smtp_proto::{Error as ParseError, Request};

use super::reply::Reply;

pub type Command = Request<String>;

/// How a command counts against the session's limits (Postfix `smtpd_junk_command_limit`).
pub fn is_junk(cmd: &Command) -> bool {
    matches!(
        cmd,
        Request::Noop { .. }
            | Request::Vrfy { .. }
            | Request::Rset
            | Request::Help { .. }
            | Request::Expn { .. }
    )
}

/// Parses a complete line (terminator included).
pub fn parse(line: &[u8]) -> Result<Command, Reply> {
    let body = line
        .strip_suffix(b"\r\n")
        .or_else(|| line.strip_suffix(b"\n"))
        .unwrap_or(line);
    if body.iter().any(|&b| b == 0 || b == b'\r' || b == b'\n') {
        return Err(Reply::invalid_character());
    }
    // smtp-proto decodes lossily; a command is text, and bytes that are not UTF-8
    // would reach the next hop as U+FFFD.
    if std::str::from_utf8(body).is_err() {
        return Err(Reply::invalid_utf8());
    }
    // smtp-proto saturates SIZE values it cannot hold in a way that can wrap; no real
    // message has a size of more than 15 digits.
    if oversized_size_parameter(body) {
        return Err(Reply::message_too_big());
    }
    if let Some(reply) = quoted_domain(body) {
        return Err(reply);
    }
    // smtp-proto wants a CRLF-terminated line; give it one whatever the client used
    // (a copy only for the rare line that did not end in CRLF).
    let canonical: std::borrow::Cow<'_, [u8]> = if line.ends_with(b"\r\n") {
        line.into()
    } else {
        [body, b"\r\n"].concat().into()
    };
    match Request::parse(&mut canonical.iter()) {
        Ok(req) => check_addresses(postmaster(req.into_owned(), body)),
        Err(e) => Err(parse_error_reply(e)),
    }
}

/// `RCPT TO:<Postmaster>` without a domain must be accepted (RFC 5321 §4.5.1);
/// smtp-proto reads it as an empty address, so the path is taken from the line itself.
/// Any other empty recipient (`RCPT TO:<>`) stays empty and is refused as bad syntax.
fn postmaster(mut req: Command, body: &[u8]) -> Command {
    if let Request::Rcpt { to } = &mut req
        && to.address.is_empty()
    {
        let line = String::from_utf8_lossy(body);
        let path = line
            .split_once('<')
            .and_then(|(_, rest)| rest.split_once('>'))
            .map(|(p, _)| p.trim());
        if let Some(p) = path.filter(|p| p.eq_ignore_ascii_case("postmaster")) {
            to.address = p.to_string();
        }
    }
    req
}

/// Addresses with control characters (possible once quoted) cannot be written to the
/// next hop or a log line safely; non-ASCII addresses need SMTPUTF8 (RFC 6531 §3.4).
/// The domain must be a domain name: smtp-proto also takes quoted
/// text after the `@` (`a@b"> x"`), which no next hop reads back the same (found by
/// fuzzing; the local part is re-quoted for the next hop, a domain cannot be).
fn check_addresses(req: Command) -> Result<Command, Reply> {
    let bad = |a: &str| {
        a.chars().any(|c| c.is_control())
            || a.rsplit_once('@')
                .is_some_and(|(_, domain)| !is_domain(domain))
    };
    match &req {
        Request::Mail { from } if bad(&from.address) => Err(Reply::bad_sender_syntax()),
        Request::Mail { from }
            if !from.address.is_ascii() && from.flags & smtp_proto::MAIL_SMTPUTF8 == 0 =>
        {
            Err(Reply::needs_smtputf8())
        }
        Request::Rcpt { to } if to.address.is_empty() || bad(&to.address) => {
            Err(Reply::bad_recipient_syntax())
        }
        _ => Ok(req),
    }
}

/// A MAIL or RCPT path with a `"` after its last unquoted `@`, i.e. quoted text in the
/// domain: smtp-proto drops the quotes, so `<x@"evil@example.org">` would become the
/// address `x@evil@example.org`, with a domain (`example.org`) the client never wrote.
/// Checked on the raw line, where the quotes still are.
fn quoted_domain(body: &[u8]) -> Option<Reply> {
    let starts_with = |prefix: &[u8]| {
        body.get(..prefix.len())
            .is_some_and(|head| head.eq_ignore_ascii_case(prefix))
    };
    let reply = if starts_with(b"MAIL FROM:") {
        Reply::bad_sender_syntax()
    } else if starts_with(b"RCPT TO:") {
        Reply::bad_recipient_syntax()
    } else {
        return None;
    };
    let start = body.iter().position(|&b| b == b'<')?;
    let (mut quoted, mut escaped) = (false, false);
    // Past an unquoted `@`; a quote seen since the last one.
    let (mut after_at, mut quote_in_domain) = (false, false);
    for &b in &body[start + 1..] {
        match b {
            _ if escaped => escaped = false,
            b'\\' if quoted => escaped = true,
            b'"' => {
                quoted = !quoted;
                quote_in_domain |= after_at;
            }
            b'@' if !quoted => {
                after_at = true;
                quote_in_domain = false;
            }
            b'>' if !quoted => break,
            _ => {}
        }
    }
    quote_in_domain.then_some(reply)
}

/// RFC 5321 §4.1.2 `Domain`, leniently: labels of letters, digits, `-` and `_` (seen in
/// the wild), or non-ASCII (U-labels, checked against SMTPUTF8 separately). Address
/// literals never get here: smtp-proto refuses them.
fn is_domain(domain: &str) -> bool {
    // A trailing dot (the root) is tolerated, as Postfix does.
    let domain = domain.strip_suffix('.').unwrap_or(domain);
    domain.len() <= 255
        && domain.split('.').all(|label| {
            !label.is_empty()
                && label
                    .chars()
                    .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_' || !c.is_ascii())
        })
}

/// A `SIZE=` parameter with more digits than any real size.
fn oversized_size_parameter(line: &[u8]) -> bool {
    line.windows(6).enumerate().any(|(i, w)| {
        w.eq_ignore_ascii_case(b" SIZE=")
            && line[i + 6..]
                .iter()
                .take_while(|b| b.is_ascii_digit())
                .count()
                > 15
    })
}

fn parse_error_reply(e: ParseError) -> Reply {
    match e {
        ParseError::UnknownCommand => Reply::unknown_command(),
        ParseError::InvalidSenderAddress => Reply::bad_sender_syntax(),
        ParseError::InvalidRecipientAddress => Reply::bad_recipient_syntax(),
        ParseError::SyntaxError { syntax } => Reply::syntax(syntax),
        ParseError::InvalidParameter { param } => Reply::invalid_parameter(param),
        ParseError::UnsupportedParameter { param } => Reply::unsupported_parameter(&param),
        ParseError::NeedsMoreData { .. }
        | ParseError::ResponseTooLong
        | ParseError::InvalidResponse { .. } => Reply::syntax_error(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn null_sender_and_parameters_parse() {
        let Ok(Request::Mail { from }) = parse(b"MAIL FROM:<> SIZE=10 BODY=8BITMIME\r\n") else {
            panic!()
        };
        assert_eq!(from.address, "");
        assert_eq!(from.size, 10);
        assert!(
            parse(b"MAIL FROM:<a@b.example>\n").is_ok(),
            "bare LF command line"
        );
    }

    #[test]
    fn postmaster_without_a_domain_is_a_recipient() {
        for line in [
            &b"RCPT TO:<postmaster>\r\n"[..],
            b"RCPT TO:<PostMaster> NOTIFY=NEVER\r\n",
        ] {
            let Ok(Request::Rcpt { to }) = parse(line) else {
                panic!("{line:?}")
            };
            assert!(to.address.eq_ignore_ascii_case("postmaster"));
        }
        assert_eq!(parse(b"RCPT TO:<>\r\n").unwrap_err().code, 501);
        assert_eq!(parse(b"RCPT TO:<postmistress>\r\n").unwrap_err().code, 501);
    }

    #[test]
    fn refuses_bad_utf8_huge_sizes_and_unflagged_utf8() {
        assert_eq!(parse(b"EHLO \xff\xfe\r\n").unwrap_err().code, 501);
        assert_eq!(
            parse(b"MAIL FROM:<a@b> SIZE=99999999999999999999999999\r\n")
                .unwrap_err()
                .code,
            552
        );
        assert_eq!(
            parse("MAIL FROM:<üser@exämple.org>\r\n".as_bytes())
                .unwrap_err()
                .code,
            553
        );
        assert!(parse("MAIL FROM:<üser@exämple.org> SMTPUTF8\r\n".as_bytes()).is_ok());
    }

    #[test]
    fn refuses_control_bytes_and_proxy_commands() {
        assert_eq!(parse(b"MAIL FROM:<a@b>\0\r\n").unwrap_err().code, 501);
        assert_eq!(parse(b"HELO a\rb\r\n").unwrap_err().code, 501);
        assert_eq!(parse(b"XCLIENT ADDR=127.0.0.1\r\n").unwrap_err().code, 502);
        assert_eq!(parse(b"XFORWARD ADDR=127.0.0.1\r\n").unwrap_err().code, 502);
        assert_eq!(parse(b"MAIL FROM:<a@b> FOO=1\r\n").unwrap_err().code, 555);
    }
}
