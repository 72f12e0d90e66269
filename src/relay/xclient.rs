//! XCLIENT (Postfix's `XCLIENT_README`): tells the next hop who the real client is, so it
//! applies its relay and access rules to that client and not to us.

use std::net::SocketAddr;

/// Encodes `value` as RFC 3461 xtext: printable ASCII except `+` and `=` as is, every
/// other byte as `+XX`. CR, LF, spaces and NUL can therefore never reach the next hop raw.
pub fn xtext(value: &str) -> String {
    xtext_bounded(value, usize::MAX)
}

/// xtext of the longest prefix of `value` whose encoding fits in `max` bytes (an
/// encoded `+XX` triplet is never split).
fn xtext_bounded(value: &str, max: usize) -> String {
    let mut out = String::with_capacity(value.len().min(max));
    for &b in value.as_bytes() {
        let literal = (b'!'..=b'~').contains(&b) && b != b'+' && b != b'=';
        if out.len() + if literal { 1 } else { 3 } > max {
            break;
        }
        if literal {
            out.push(b as char);
        } else {
            out.push_str(&format!("+{b:02X}"));
        }
    }
    out
}

/// What the next hop learns about the client.
#[derive(Debug, Clone)]
pub struct ClientIdentity {
    pub addr: SocketAddr,
    pub helo: Option<String>,
    /// `ESMTP` after EHLO, `SMTP` after HELO.
    pub esmtp: bool,
    /// SASL login name, once authentication exists.
    pub login: Option<String>,
}

/// Longest XCLIENT command we send; RFC 5321 §4.5.3.1.4 guarantees 512 octets.
const MAX_COMMAND: usize = 512;
/// Encoded HELO values are cut to this length so one attribute always fits a command.
const MAX_ENCODED_HELO: usize = 255;

/// Builds the XCLIENT command lines (CRLF included) announcing `client`, split so each
/// stays within 512 octets. `offered` is the attribute list from the next hop's EHLO.
pub fn commands(client: &ClientIdentity, offered: &[String]) -> Vec<String> {
    let has =
        |name: &str| offered.is_empty() || offered.iter().any(|a| a.eq_ignore_ascii_case(name));
    let mut attrs = Vec::new();
    if has("NAME") {
        // No reverse lookup is done here: say so rather than pass our own name.
        attrs.push("NAME=[UNAVAILABLE]".to_string());
    }
    if has("ADDR") {
        let ip = client.addr.ip().to_canonical();
        let addr = match ip {
            std::net::IpAddr::V4(v4) => v4.to_string(),
            std::net::IpAddr::V6(v6) => format!("IPV6:{v6}"),
        };
        attrs.push(format!("ADDR={}", xtext(&addr)));
    }
    if has("PORT") {
        attrs.push(format!("PORT={}", client.addr.port()));
    }
    if has("PROTO") {
        attrs.push(format!(
            "PROTO={}",
            if client.esmtp { "ESMTP" } else { "SMTP" }
        ));
    }
    if has("HELO") {
        match &client.helo {
            Some(h) => attrs.push(format!("HELO={}", xtext_bounded(h, MAX_ENCODED_HELO))),
            None => attrs.push("HELO=[UNAVAILABLE]".to_string()),
        }
    }
    if let Some(login) = &client.login
        && has("LOGIN")
    {
        attrs.push(format!("LOGIN={}", xtext_bounded(login, MAX_ENCODED_HELO)));
    }
    let mut lines = Vec::new();
    let mut line = String::from("XCLIENT");
    for attr in attrs {
        if line.len() + 1 + attr.len() + 2 > MAX_COMMAND && line != "XCLIENT" {
            lines.push(format!("{line}\r\n"));
            line = String::from("XCLIENT");
        }
        line.push(' ');
        line.push_str(&attr);
    }
    if line != "XCLIENT" {
        lines.push(format!("{line}\r\n"));
    }
    lines
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn xtext_encodes_specials() {
        assert_eq!(xtext("mx.example.com"), "mx.example.com");
        assert_eq!(xtext("a b+c=d\r\n"), "a+20b+2Bc+3Dd+0D+0A");
        assert_eq!(xtext("é"), "+C3+A9");
    }

    #[test]
    fn builds_postfix_style_command() {
        let c = ClientIdentity {
            addr: "192.0.2.7:40000".parse().unwrap(),
            helo: Some("x;dmarc=pass (".into()),
            esmtp: true,
            login: None,
        };
        let lines = commands(&c, &[]);
        assert_eq!(
            lines,
            vec![
                "XCLIENT NAME=[UNAVAILABLE] ADDR=192.0.2.7 PORT=40000 PROTO=ESMTP HELO=x;dmarc+3Dpass+20(\r\n"
            ]
        );
        let v6 = ClientIdentity {
            addr: "[2001:db8::1]:25".parse().unwrap(),
            ..c
        };
        assert!(commands(&v6, &["ADDR".into()])[0].contains("ADDR=IPV6:2001:db8::1"));
    }

    #[test]
    fn long_helo_is_split_and_bounded() {
        let c = ClientIdentity {
            addr: "192.0.2.7:40000".parse().unwrap(),
            helo: Some("\u{7f}".repeat(400)),
            esmtp: false,
            login: Some("\u{7f}".repeat(400)),
        };
        let lines = commands(&c, &[]);
        assert!(lines.len() >= 2);
        for l in &lines {
            assert!(l.starts_with("XCLIENT "));
            assert!(l.matches("\r\n").count() == 1 && l.ends_with("\r\n"));
            assert!(l.len() <= 512, "{} octets", l.len());
        }
    }
}
