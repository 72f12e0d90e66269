//! A safe look at a held message: a few headers and a plain-text preview. Nothing is
//! rendered: HTML is reduced to text, control characters (terminal escapes) are removed,
//! and no link or image is ever fetched.

use mail_parser::MessageParser;

/// Headers worth showing, unfolded and decoded.
pub fn header_summary(message: &[u8]) -> Vec<(String, String)> {
    let fields = crate::auth::headers::fields(message);
    [
        "From",
        "To",
        "Cc",
        "Subject",
        "Date",
        "Message-ID",
        "Reply-To",
        "Return-Path",
    ]
    .iter()
    .filter_map(|name| {
        crate::auth::headers::first(&fields, name)
            .map(|f| (name.to_string(), safe_text(&decode_words(&f.value))))
    })
    .collect()
}

/// The first `max` characters of the message's text (HTML converted to text).
pub fn text_preview(message: &[u8], max: usize) -> String {
    let text = MessageParser::default()
        .parse(message)
        .and_then(|m| m.body_text(0).map(|t| t.into_owned()))
        .unwrap_or_default();
    let mut out = safe_text(&text);
    if out.chars().count() > max {
        out = out.chars().take(max).collect();
        out.push_str("\n[…]");
    }
    out
}

/// Decodes RFC 2047 encoded-words in a header value.
fn decode_words(value: &str) -> String {
    let raw = format!("Subject: {value}\r\n\r\n");
    MessageParser::default()
        .parse(raw.as_bytes())
        .and_then(|m| m.subject().map(str::to_string))
        .unwrap_or_else(|| value.to_string())
}

/// Keeps newlines and tabs, drops every other control character.
pub fn safe_text(s: &str) -> String {
    s.chars()
        .filter(|c| !c.is_control() || *c == '\n' || *c == '\t')
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn html_and_escapes_are_neutralised() {
        let m = b"From: =?utf-8?B?QWxpY2U=?= <a@b.example>\r\nSubject: hi\x1b[31m\r\nContent-Type: text/html\r\n\r\n<html><script>alert(1)</script><p>Hello <img src=\"http://x/y.png\"> world</p></html>\r\n";
        let h = header_summary(m);
        assert_eq!(
            h[0],
            ("From".to_string(), "Alice <a@b.example>".to_string())
        );
        assert!(!h[1].1.contains('\x1b'));
        let p = text_preview(m, 100);
        assert!(p.contains("Hello"), "{p}");
        assert!(!p.contains("<img"), "{p}");
    }
}
