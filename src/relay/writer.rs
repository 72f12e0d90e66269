//! The canonical encoder for message content sent to the next hop.
//!
//! Whatever the input, the output is CRLF-terminated lines, dot-stuffed (RFC 5321
//! §4.5.2), followed by exactly one `.<CRLF>`. Even if a bare CR or LF slipped past the
//! DATA reader, it cannot end the message early at the next hop (SMTP smuggling, 2023).

/// Encodes `headers` (lines without terminators, added at the top) and `message`
/// as the DATA payload, final `.<CRLF>` included.
pub fn encode_data(headers: &[String], message: &[u8]) -> Vec<u8> {
    let extra: usize = headers.iter().map(|h| h.len() + 3).sum();
    let mut out = Vec::with_capacity(message.len() + message.len() / 64 + extra + 8);
    for h in headers {
        push_content(h.as_bytes(), &mut out);
        // A header that carried its own terminator got it from push_content.
        if !out.ends_with(b"\r\n") {
            out.extend_from_slice(b"\r\n");
        }
    }
    push_content(message, &mut out);
    if !out.is_empty() && !out.ends_with(b"\r\n") {
        out.extend_from_slice(b"\r\n");
    }
    out.extend_from_slice(b".\r\n");
    out
}

/// Appends `bytes` as canonical lines: every LF becomes CRLF, a CR not followed by LF
/// becomes a space, and a line starting with `.` gets a second one.
fn push_content(bytes: &[u8], out: &mut Vec<u8>) {
    let mut at_line_start = out.is_empty() || out.ends_with(b"\r\n");
    let mut i = 0;
    while i < bytes.len() {
        let b = bytes[i];
        if at_line_start && b == b'.' {
            out.push(b'.');
        }
        at_line_start = false;
        match b {
            b'\r' if bytes.get(i + 1) == Some(&b'\n') => {
                out.extend_from_slice(b"\r\n");
                i += 1;
                at_line_start = true;
            }
            b'\r' => out.push(b' '),
            b'\n' => {
                out.extend_from_slice(b"\r\n");
                at_line_start = true;
            }
            _ => out.push(b),
        }
        i += 1;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stuffs_and_terminates() {
        let out = encode_data(&["X-A: 1".into()], b"Subject: t\r\n\r\n.hidden\r\n.\r\nend");
        assert_eq!(
            out,
            b"X-A: 1\r\nSubject: t\r\n\r\n..hidden\r\n..\r\nend\r\n.\r\n"
        );
    }

    #[test]
    fn bare_endings_cannot_smuggle() {
        let out = encode_data(&[], b"a\n.\nMAIL FROM:<x@y>\r.\r\n");
        assert_eq!(out, b"a\r\n..\r\nMAIL FROM:<x@y> .\r\n.\r\n");
        // Exactly one end-of-data sequence, at the very end.
        let text = String::from_utf8(out).unwrap();
        assert_eq!(text.matches("\r\n.\r\n").count(), 1);
        assert!(text.ends_with("\r\n.\r\n"));
    }

    #[test]
    fn empty_message_is_just_the_dot() {
        assert_eq!(encode_data(&[], b""), b".\r\n");
    }
}
