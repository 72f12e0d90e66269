//! Turning one client line into a typed command, or into the reply explaining why not.
//!
//! smtp-proto does the grammar; this adds what a proxy must also refuse: NUL and bare CR
//! anywhere in a command (they would end up in commands or headers built downstream),
//! and the commands a client must never get through to the next hop (XCLIENT, XFORWARD).

use smtp_proto::{Error as ParseError, Request};

use super::reply::{Enhanced, Reply, sanitize};

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
        return Err(Reply::new(
            501,
            Enhanced(5, 5, 2),
            "Invalid character in command",
        ));
    }
    // smtp-proto wants a CRLF-terminated line; give it one whatever the client used.
    let mut canonical = Vec::with_capacity(body.len() + 2);
    canonical.extend_from_slice(body);
    canonical.extend_from_slice(b"\r\n");
    match Request::parse(&mut canonical.iter()) {
        Ok(req) => Ok(req.into_owned()),
        Err(e) => Err(parse_error_reply(e)),
    }
}

fn parse_error_reply(e: ParseError) -> Reply {
    match e {
        ParseError::UnknownCommand => Reply::new(502, Enhanced(5, 5, 1), "Command not recognized"),
        ParseError::InvalidSenderAddress => {
            Reply::new(501, Enhanced(5, 1, 7), "Bad sender address syntax")
        }
        ParseError::InvalidRecipientAddress => {
            Reply::new(501, Enhanced(5, 1, 3), "Bad recipient address syntax")
        }
        ParseError::SyntaxError { syntax } => {
            Reply::new(501, Enhanced(5, 5, 4), format!("Syntax: {syntax}"))
        }
        ParseError::InvalidParameter { param } => {
            Reply::new(501, Enhanced(5, 5, 4), format!("Invalid parameter {param}"))
        }
        ParseError::UnsupportedParameter { param } => Reply::new(
            555,
            Enhanced(5, 5, 4),
            format!("Unsupported parameter {}", sanitize(&param)),
        ),
        ParseError::NeedsMoreData { .. }
        | ParseError::ResponseTooLong
        | ParseError::InvalidResponse { .. } => Reply::new(500, Enhanced(5, 5, 2), "Syntax error"),
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
    fn refuses_control_bytes_and_proxy_commands() {
        assert_eq!(parse(b"MAIL FROM:<a@b>\0\r\n").unwrap_err().code, 501);
        assert_eq!(parse(b"HELO a\rb\r\n").unwrap_err().code, 501);
        assert_eq!(parse(b"XCLIENT ADDR=127.0.0.1\r\n").unwrap_err().code, 502);
        assert_eq!(parse(b"XFORWARD ADDR=127.0.0.1\r\n").unwrap_err().code, 502);
        assert_eq!(parse(b"MAIL FROM:<a@b> FOO=1\r\n").unwrap_err().code, 555);
    }
}
