//! Header work around verification: the `Authentication-Results` we add (RFC 8601), the
//! forged ones we remove, and reading single header fields.
//!
//! Every value we write comes from a restricted alphabet, so nothing an attacker puts in
//! HELO, MAIL FROM or a DKIM tag can start a new result, a comment or a header line.

use std::borrow::Cow;
use std::fmt::{self, Write as _};
use std::ops::Range;

use super::{AuthReport, AuthResult};

/// Keeps only characters that are safe in an RFC 8601 pvalue domain or token (written
/// as it is displayed, so building the header copies nothing twice).
struct Safe<'a>(&'a str);

impl fmt::Display for Safe<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.0
            .chars()
            .filter(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '-' | '_'))
            .take(255)
            .try_for_each(|c| f.write_char(c))
    }
}

/// Keeps only characters that are safe inside an RFC 8601 comment of ours: no
/// parentheses, backslashes, quotes, semicolons or line breaks, so a comment can neither
/// end early nor start a new result.
struct CommentSafe<'a>(&'a str);

impl fmt::Display for CommentSafe<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.0
            .chars()
            .filter(|c| c.is_ascii_alphanumeric() || matches!(c, ' ' | '.' | '-' | '_' | ':' | '='))
            .take(120)
            .try_for_each(|c| f.write_char(c))
    }
}

/// The `Authentication-Results` value (authserv-id first), its results joined by `sep`
/// (`"; "` on one line, `";\r\n\t"` folded in a header). Written into one string: it
/// is built for every message.
pub fn authentication_results(authserv_id: &str, report: &AuthReport, sep: &str) -> String {
    let mut out = String::with_capacity(320);
    // Writing into a String cannot fail.
    let _ = write_results(&mut out, authserv_id, report, sep);
    out
}

fn write_results(
    out: &mut String,
    authserv_id: &str,
    report: &AuthReport,
    sep: &str,
) -> fmt::Result {
    write!(out, "{}", Safe(authserv_id))?;
    let spf = &report.spf;
    write!(
        out,
        "{sep}spf={}{} smtp.mailfrom={}",
        spf.mail_from.result.as_str(),
        StaleComment("record", report.stale.spf),
        Safe(&spf.mail_from.domain)
    )?;
    if spf.helo.result != AuthResult::None && !spf.helo.domain.is_empty() {
        write!(
            out,
            "{sep}spf={}{} smtp.helo={}",
            spf.helo.result.as_str(),
            StaleComment("record", report.stale.spf_helo),
            Safe(&spf.helo.domain)
        )?;
    }
    if report.dkim.is_empty() {
        write!(out, "{sep}dkim=none")?;
    }
    for d in &report.dkim {
        write!(
            out,
            "{sep}dkim={}{}",
            d.result.as_str(),
            StaleComment("key", d.stale_secs)
        )?;
        // `policy` (an l= signature with content after the signed length) says why in a
        // comment (RFC 8601 §2.7.1): the reason is ours, built from a number.
        if d.result == AuthResult::Policy
            && let Some(reason) = &d.reason
        {
            write!(out, " ({})", CommentSafe(reason))?;
        }
        if !d.domain.is_empty() {
            write!(
                out,
                " header.d={} header.s={}",
                Safe(&d.domain),
                Safe(&d.selector)
            )?;
        }
        if !d.algorithm.is_empty() {
            write!(out, " header.a={}", Safe(&d.algorithm))?;
        }
    }
    if report.arc.result != AuthResult::None {
        write!(
            out,
            "{sep}arc={}{}",
            report.arc.result.as_str(),
            StaleComment("key", report.stale.arc)
        )?;
    }
    out.push_str(sep);
    write_dmarc_result(out, &report.dmarc, report.stale.dmarc)
}

/// ` (stale key, 3h old)` when a result rests on a stale DNS answer (serve-stale) of
/// that age in seconds; nothing otherwise. Built from a number: nothing of the sender's.
struct StaleComment(&'static str, Option<u64>);

impl fmt::Display for StaleComment {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let StaleComment(what, Some(secs)) = *self else {
            return Ok(());
        };
        match secs {
            0..60 => write!(f, " (stale {what}, {secs}s old)"),
            60..3600 => write!(f, " (stale {what}, {}m old)", secs / 60),
            _ => write!(f, " (stale {what}, {}h old)", secs / 3600),
        }
    }
}

/// `dmarc=<result> [(<comment>)] header.from=<d> policy.dmarc=<applied>
/// [policy.arc-override=<sealer>]`. `policy.dmarc` is the applied policy (RFC 7489
/// §11.2: "after policy options including pct: and sp: have been processed"); when it
/// differs from the published one, the comment says why: `(p=reject, not in the pct=0
/// sample)`, `(p=quarantine, t=y testing)`, `(p=reject, ARC override by <sealer>)`.
/// Comments hold no `;`, so that naive splitters of the field still see one result.
fn write_dmarc_result(
    out: &mut String,
    d: &super::DmarcCheck,
    stale_secs: Option<u64>,
) -> fmt::Result {
    write!(
        out,
        "dmarc={}{}",
        d.result.as_str(),
        StaleComment("record", stale_secs)
    )?;
    let not_sampled = matches!((d.pct, d.pct_sampled), (Some(_), Some(false)));
    let any_why = not_sampled || d.testing || d.arc_override.is_some();
    if let (Some(published), true) = (d.published_policy, any_why) {
        write!(out, " (p={published}")?;
        if let (true, Some(pct)) = (not_sampled, d.pct) {
            write!(out, ", not in the pct={pct} sample")?;
        }
        if d.testing {
            out.push_str(", t=y testing");
        }
        if let Some(sealer) = &d.arc_override {
            write!(out, ", ARC override by {}", Safe(sealer))?;
        }
        out.push(')');
    }
    if !d.header_from.is_empty() {
        write!(out, " header.from={}", Safe(&d.header_from))?;
    }
    if let Some(p) = d.policy {
        write!(out, " policy.dmarc={p}")?;
    }
    if let Some(sealer) = &d.arc_override {
        write!(out, " policy.arc-override={}", Safe(sealer))?;
    }
    Ok(())
}

/// One header field: its name, its unfolded value, and its byte range in the message
/// (continuation lines and the final CRLF included).
pub struct Field<'a> {
    pub name: &'a str,
    /// Borrowed from the message unless unfolding or invalid UTF-8 made a new string.
    pub value: Cow<'a, str>,
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
                let value = last.value.to_mut();
                value.push(' ');
                value.push_str(String::from_utf8_lossy(text).trim());
                last.range.end = end;
            }
        } else if let Some(colon) = text.iter().position(|&b| b == b':') {
            let name = std::str::from_utf8(&text[..colon]).unwrap_or("").trim();
            out.push(Field {
                name,
                value: trimmed(String::from_utf8_lossy(&text[colon + 1..])),
                range: pos..end,
            });
        }
        pos = end;
    }
    out
}

/// `text` without leading and trailing whitespace, still borrowed when it was.
fn trimmed(text: Cow<'_, str>) -> Cow<'_, str> {
    match text {
        Cow::Borrowed(t) => Cow::Borrowed(t.trim()),
        Cow::Owned(t) => Cow::Owned(t.trim().to_string()),
    }
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
    let ours = normalize_authserv_id(authserv_id);
    fields
        .iter()
        .filter(|f| {
            (f.name.eq_ignore_ascii_case("Authentication-Results")
                && authserv_id_of(&f.value).is_some_and(|id| normalize_authserv_id(&id) == ours))
                || f.name.eq_ignore_ascii_case(verdict_header)
        })
        .map(|f| f.range.clone())
        .collect()
}

/// The form two authserv-ids are compared in: a domain name compares without case and
/// without a trailing dot, whichever way it was written.
fn normalize_authserv_id(id: &str) -> String {
    id.trim().trim_end_matches('.').to_ascii_lowercase()
}

/// The authserv-id of an `Authentication-Results` value, read as RFC 8601 §2.2 defines
/// it: `[CFWS] authserv-id`, where authserv-id is an RFC 2045 `value` (a token or a
/// quoted-string) and comments may nest. `"mx.example.org"`, `(c) MX.Example.ORG.` and
/// `mx.example.org(c);` all name the same server. `None` for a value that does not start
/// with one (nothing to compare).
fn authserv_id_of(value: &str) -> Option<String> {
    let mut chars = value.chars().peekable();
    // Leading CFWS: white space and (nested) comments.
    let mut depth = 0usize;
    while let Some(&c) = chars.peek() {
        match c {
            '(' => depth += 1,
            ')' if depth > 0 => depth -= 1,
            '\\' if depth > 0 => {
                chars.next();
            }
            c if depth > 0 || c.is_whitespace() => {}
            _ => break,
        }
        chars.next();
    }
    let mut id = String::new();
    if chars.peek() == Some(&'"') {
        chars.next();
        while let Some(c) = chars.next() {
            match c {
                '\\' => id.extend(chars.next()),
                '"' => return Some(id),
                c => id.push(c),
            }
        }
        // Unterminated: a lenient reader downstream may still take the start as the
        // id, so compare that (stripping too much is harmless, too little is not).
        return id.split([';', ' ', '\t']).next().map(str::to_string);
    }
    // RFC 2045 token: up to white space, a comment, `;` or another tspecial.
    for c in chars {
        if c.is_whitespace() || c.is_control() || "()<>@,;:\\\"/[]?=".contains(c) {
            break;
        }
        id.push(c);
    }
    (!id.is_empty()).then_some(id)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::auth::*;

    #[test]
    fn stale_results_say_so_in_comments() {
        let mut r = report();
        r.dkim[0].stale_secs = Some(3 * 3600 + 5);
        r.stale.spf = Some(42);
        r.stale.dmarc = Some(600);
        let ar = authentication_results("mx.example.net", &r, "; ");
        assert!(
            ar.contains("dkim=pass (stale key, 3h old) header.d=example.com"),
            "{ar}"
        );
        assert!(
            ar.contains("spf=pass (stale record, 42s old) smtp.mailfrom="),
            "{ar}"
        );
        assert!(
            ar.contains("dmarc=pass (stale record, 10m old) header.from="),
            "{ar}"
        );
        // Fresh results carry no comment.
        let fresh = authentication_results("mx.example.net", &report(), "; ");
        assert!(!fresh.contains("stale"), "{fresh}");
    }

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
                stale_secs: None,
            }],
            arc: ArcCheck::none(AuthResult::None),
            dmarc: DmarcCheck {
                policy: Some("reject"),
                published_policy: Some("reject"),
                ..DmarcCheck::without_record(AuthResult::Pass, "example.com".into())
            },
            work: WorkCounts::default(),
            stale: Default::default(),
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
    fn dmarc_shows_published_and_applied_policy() {
        let mut r = report();
        r.dmarc.result = AuthResult::Fail;
        r.dmarc.pct = Some(0);
        r.dmarc.pct_sampled = Some(false);
        r.dmarc.policy = Some("quarantine");
        let ar = authentication_results("mx.example.org", &r, "; ");
        assert!(
            ar.ends_with("; dmarc=fail (p=reject, not in the pct=0 sample) header.from=example.com policy.dmarc=quarantine"),
            "{ar}"
        );
        r.dmarc.testing = true;
        let ar = authentication_results("mx.example.org", &r, "; ");
        assert!(
            ar.contains(
                "; dmarc=fail (p=reject, not in the pct=0 sample, t=y testing) header.from="
            ),
            "{ar}"
        );
        r.dmarc.testing = false;
        r.dmarc.pct = None;
        r.dmarc.pct_sampled = None;
        r.dmarc.policy = Some("none");
        r.dmarc.arc_override = Some("sealer.example;dmarc=pass".into());
        let ar = authentication_results("mx.example.org", &r, "; ");
        assert!(
            ar.ends_with("; dmarc=fail (p=reject, ARC override by sealer.exampledmarcpass) header.from=example.com policy.dmarc=none policy.arc-override=sealer.exampledmarcpass"),
            "{ar}"
        );
        assert_eq!(ar.matches(';').count(), 3, "{ar}");
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

    #[test]
    fn authserv_id_is_read_as_rfc_8601_writes_it() {
        for forged in [
            "mx.example.org; dmarc=pass",
            "\"mx.example.org\"; dmarc=pass",
            "\"MX.example.org.\" 1; dmarc=pass",
            "mx.example.org.; dmarc=pass",
            "(a (nested) comment)mx.example.org(c);dmarc=pass",
            "  \t mx.EXAMPLE.org 1 ; dmarc=pass",
            "\"mx.ex\\ample.org\"; dmarc=pass",
            "\"mx.example.org; dmarc=pass",
        ] {
            let msg = format!("Authentication-Results: {forged}\r\nSubject: x\r\n\r\n");
            let f = fields(msg.as_bytes());
            assert_eq!(
                forged_ranges(&f, "mx.example.org", "X-V").len(),
                1,
                "{forged}"
            );
        }
        for other in [
            "mx.example.org.evil; dmarc=pass",
            "other.example; dmarc=pass (mx.example.org)",
            "",
        ] {
            let msg = format!("Authentication-Results: {other}\r\nSubject: x\r\n\r\n");
            let f = fields(msg.as_bytes());
            assert!(
                forged_ranges(&f, "mx.example.org", "X-V").is_empty(),
                "{other}"
            );
        }
    }
}
