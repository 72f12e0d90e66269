//! Header work around verification: the `Authentication-Results` we add (RFC 8601), the
//! forged ones we remove, and reading single header fields.
//!
//! Every value we write comes from a restricted alphabet, so nothing an attacker puts in
//! HELO, MAIL FROM or a DKIM tag can start a new result, a comment or a header line.

use std::ops::Range;

use super::{AuthReport, AuthResult};

/// Keeps only characters that are safe in an RFC 8601 pvalue domain or token.
fn safe(value: &str) -> String {
    value
        .chars()
        .filter(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '-' | '_'))
        .take(255)
        .collect()
}

/// Keeps only characters that are safe inside an RFC 8601 comment of ours: no
/// parentheses, backslashes, quotes, semicolons or line breaks, so a comment can neither
/// end early nor start a new result.
fn comment_safe(value: &str) -> String {
    value
        .chars()
        .filter(|c| c.is_ascii_alphanumeric() || matches!(c, ' ' | '.' | '-' | '_' | ':' | '='))
        .take(120)
        .collect()
}

/// The `Authentication-Results` value (authserv-id first), its results joined by `sep`
/// (`"; "` on one line, `";\r\n\t"` folded in a header).
pub fn authentication_results(authserv_id: &str, report: &AuthReport, sep: &str) -> String {
    let mut parts = vec![safe(authserv_id)];
    let spf = &report.spf;
    parts.push(format!(
        "spf={} smtp.mailfrom={}",
        spf.mail_from.result.as_str(),
        safe(&spf.mail_from.domain)
    ));
    if spf.helo.result != AuthResult::None && !spf.helo.domain.is_empty() {
        parts.push(format!(
            "spf={} smtp.helo={}",
            spf.helo.result.as_str(),
            safe(&spf.helo.domain)
        ));
    }
    if report.dkim.is_empty() {
        parts.push("dkim=none".to_string());
    }
    for d in &report.dkim {
        let mut s = format!("dkim={}", d.result.as_str());
        // `policy` (an l= signature with content after the signed length) says why in a
        // comment (RFC 8601 §2.7.1): the reason is ours, built from a number.
        if d.result == AuthResult::Policy
            && let Some(reason) = &d.reason
        {
            s.push_str(&format!(" ({})", comment_safe(reason)));
        }
        if !d.domain.is_empty() {
            s.push_str(&format!(
                " header.d={} header.s={}",
                safe(&d.domain),
                safe(&d.selector)
            ));
        }
        if !d.algorithm.is_empty() {
            s.push_str(&format!(" header.a={}", safe(&d.algorithm)));
        }
        parts.push(s);
    }
    if report.arc.result != AuthResult::None {
        parts.push(format!("arc={}", report.arc.result.as_str()));
    }
    let mut dmarc = format!("dmarc={}", report.dmarc.result.as_str());
    if !report.dmarc.header_from.is_empty() {
        dmarc.push_str(&format!(" header.from={}", safe(&report.dmarc.header_from)));
    }
    if let Some(p) = report.dmarc.policy {
        dmarc.push_str(&format!(" policy.dmarc={p}"));
    }
    parts.push(dmarc);
    parts.join(sep)
}

/// One header field: its name, its unfolded value, and its byte range in the message
/// (continuation lines and the final CRLF included).
pub struct Field<'a> {
    pub name: &'a str,
    pub value: String,
    pub range: Range<usize>,
}

/// The header fields of `message`, in order, stopping at the empty line.
pub fn fields(message: &[u8]) -> Vec<Field<'_>> {
    let mut out: Vec<Field<'_>> = Vec::new();
    let mut pos = 0;
    while pos < message.len() {
        let end = message[pos..]
            .iter()
            .position(|&b| b == b'\n')
            .map_or(message.len(), |i| pos + i + 1);
        let line = &message[pos..end];
        let text = line.strip_suffix(b"\n").unwrap_or(line);
        let text = text.strip_suffix(b"\r").unwrap_or(text);
        if text.is_empty() {
            break;
        }
        if matches!(text[0], b' ' | b'\t') {
            if let Some(last) = out.last_mut() {
                last.value.push(' ');
                last.value.push_str(String::from_utf8_lossy(text).trim());
                last.range.end = end;
            }
        } else if let Some(colon) = text.iter().position(|&b| b == b':') {
            let name = std::str::from_utf8(&text[..colon]).unwrap_or("").trim();
            out.push(Field {
                name,
                value: String::from_utf8_lossy(&text[colon + 1..])
                    .trim()
                    .to_string(),
                range: pos..end,
            });
        }
        pos = end;
    }
    out
}

/// The first field named `name` (case-insensitive), unfolded.
pub fn first<'a>(fields: &'a [Field<'a>], name: &str) -> Option<&'a Field<'a>> {
    fields.iter().find(|f| f.name.eq_ignore_ascii_case(name))
}

/// Byte ranges of header fields that must not reach the next hop: any
/// `Authentication-Results` claiming our authserv-id (RFC 8601 §5: a forged one would
/// be believed downstream) and any copy of our verdict header.
pub fn forged_ranges(
    fields: &[Field<'_>],
    authserv_id: &str,
    verdict_header: &str,
) -> Vec<Range<usize>> {
    fields
        .iter()
        .filter(|f| {
            (f.name.eq_ignore_ascii_case("Authentication-Results")
                && authserv_id_of(&f.value).eq_ignore_ascii_case(authserv_id))
                || f.name.eq_ignore_ascii_case(verdict_header)
        })
        .map(|f| f.range.clone())
        .collect()
}

/// The authserv-id of an `Authentication-Results` value: the first token, with any
/// RFC 5322 comments removed (`(comment) mx.example.org (x); ...`).
fn authserv_id_of(value: &str) -> String {
    let mut depth = 0usize;
    let mut out = String::new();
    for c in value.chars() {
        match c {
            '(' => depth += 1,
            ')' => depth = depth.saturating_sub(1),
            ';' if depth == 0 => break,
            c if depth == 0 => out.push(c),
            _ => {}
        }
    }
    out.split_whitespace().next().unwrap_or("").to_string()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::auth::*;

    fn report() -> AuthReport {
        AuthReport {
            spf: SpfPair {
                mail_from: SpfCheck {
                    result: AuthResult::Pass,
                    domain: "example.com".into(),
                },
                helo: SpfCheck {
                    result: AuthResult::None,
                    domain: "x;dmarc=pass (".into(),
                },
            },
            dkim: vec![DkimCheck {
                result: AuthResult::Pass,
                domain: "example.com".into(),
                selector: "s1\r\nX-Evil: 1".into(),
                algorithm: "rsa-sha256".into(),
                reason: None,
            }],
            arc: ArcCheck {
                result: AuthResult::None,
                sealers: vec![],
            },
            dmarc: DmarcCheck {
                result: AuthResult::Pass,
                policy: Some("reject"),
                header_from: "example.com".into(),
            },
            work: WorkCounts::default(),
        }
    }

    #[test]
    fn writes_a_single_safe_header() {
        let ar = authentication_results("mx.example.org", &report(), "; ");
        assert_eq!(
            ar,
            "mx.example.org; spf=pass smtp.mailfrom=example.com; dkim=pass header.d=example.com header.s=s1X-Evil1 header.a=rsa-sha256; dmarc=pass header.from=example.com policy.dmarc=reject"
        );
        let mut r = report();
        r.spf.helo.result = AuthResult::Fail;
        let ar = authentication_results("mx.example.org", &r, "; ");
        assert!(ar.contains("smtp.helo=xdmarcpass"), "{ar}");
        assert_eq!(ar.matches("; dmarc=").count(), 1);
    }

    #[test]
    fn policy_result_carries_its_reason_in_a_safe_comment() {
        let mut r = report();
        r.dkim[0].result = AuthResult::Policy;
        r.dkim[0].reason = Some("body length limit: 37 unsigned octets appended".into());
        let ar = authentication_results("mx.example.org", &r, "; ");
        assert!(
            ar.contains("dkim=policy (body length limit: 37 unsigned octets appended) header.d=example.com header.s=s1X-Evil1"),
            "{ar}"
        );
        // Whatever a reason holds, it cannot close the comment or start a result.
        r.dkim[0].reason = Some("x); dmarc=pass (\\\r\n".into());
        let ar = authentication_results("mx.example.org", &r, "; ");
        assert!(ar.contains("dkim=policy (x dmarc=pass ) header.d="), "{ar}");
        assert_eq!(ar.matches("dmarc=pass").count(), 2, "{ar}");
        assert_eq!(ar.matches(';').count(), 3, "{ar}");
        // Other results carry no comment.
        r.dkim[0].result = AuthResult::Fail;
        let ar = authentication_results("mx.example.org", &r, "; ");
        assert!(ar.contains("dkim=fail header.d="), "{ar}");
    }

    #[test]
    fn finds_forged_results() {
        let msg = b"Authentication-Results: (c) MX.example.org (x);\r\n dmarc=pass\r\nAuthentication-Results: other.example; spf=pass\r\nX-Mailwarden-Verdict: clean\r\nSubject: hi\r\n\r\nAuthentication-Results: mx.example.org; body\r\n";
        let f = fields(msg);
        assert_eq!(f.len(), 4);
        let ranges = forged_ranges(&f, "mx.example.org", "X-Mailwarden-Verdict");
        assert_eq!(ranges.len(), 2);
        assert_eq!(
            &msg[ranges[0].clone()],
            b"Authentication-Results: (c) MX.example.org (x);\r\n dmarc=pass\r\n"
        );
        assert_eq!(first(&f, "subject").unwrap().value, "hi");
    }
}
