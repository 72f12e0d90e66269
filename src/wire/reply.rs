//! SMTP replies: the one type every handler returns, rendered in one place.
//!
//! Replies relayed from the next hop are re-built from parsed parts (code, enhanced code,
//! sanitized text), never copied raw, so a hostile next hop cannot inject bytes into the
//! client's stream.

use std::fmt;

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

    /// Appends the wire form (CRLF lines, `-` continuation) to `out`.
    pub fn write_to(&self, out: &mut Vec<u8>) {
        let last = self.lines.len().saturating_sub(1);
        let empty = [String::new()];
        let lines: &[String] = if self.lines.is_empty() {
            &empty
        } else {
            &self.lines
        };
        for (i, line) in lines.iter().enumerate() {
            let sep = if i == last { ' ' } else { '-' };
            let text = match &self.enhanced {
                Some(e) => format!("{e} {line}"),
                None => line.clone(),
            };
            out.extend_from_slice(format!("{}{}{}", self.code, sep, text.trim_end()).as_bytes());
            out.extend_from_slice(b"\r\n");
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
    text.chars()
        .map(|c| if (' '..='~').contains(&c) { c } else { '?' })
        .take(400)
        .collect::<String>()
        .trim()
        .to_string()
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

    #[test]
    fn sanitizes_text() {
        let r = Reply::from_lines(&["554 5.7.1 bad\x1b[31m \x00x".into()]).unwrap();
        assert_eq!(r.lines[0], "bad?[31m ?x");
    }
}
