//! Mailing one report: which `rua=` destinations may get it, the message, the send.
//!
//! * Only `mailto:` URIs are used (RFC 7489 §7.2.1.1; other schemes are skipped).
//! * **External destinations** (RFC 7489 §7.1): a destination outside the reporting
//!   domain must confirm with a `v=DMARC1` TXT record at
//!   `<reporting-domain>._report._dmarc.<destination-domain>`, or it gets nothing;
//!   otherwise anyone could publish `rua=mailto:victim@elsewhere` and turn us into a
//!   mail cannon. "Outside" is judged without a public suffix list (the project has
//!   none, see `auth::dmarc`): the destination's domain must be the reporting domain
//!   or under it, otherwise it is verified. That is stricter than the RFC (which
//!   compares organizational domains): a record at `sub.example.com` with reports to
//!   `example.com` needs the verification record too. A verification record's own
//!   `rua=` (the RFC 7489 redirection) is not followed (RFC 9990 drops it).
//! * **Size** (`!10m`): the whole report message must fit, otherwise that destination
//!   is skipped (RFC 7489 §7.2.1.1).

use hickory_resolver::TokioResolver;
use hickory_resolver::net::{DnsError, NetError};
use hickory_resolver::proto::rr::{RData, RecordType};
use smtp_proto::{MailFrom, RcptTo};

use super::store::StoredReport;
use crate::relay::one_shot::{self, Message, Sent};
use crate::relay::{ClientIdentity, NextHop};

/// One `mailto:` destination of `rua=`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Destination {
    pub address: String,
    /// Largest report message in bytes (`!size`), when limited.
    pub limit: Option<u64>,
}

impl Destination {
    pub fn domain(&self) -> &str {
        self.address.rsplit_once('@').map_or("", |(_, d)| d)
    }
}

/// `%XX` decoding (RFC 3986) for the address part of a `mailto:` URI.
fn percent_decode(s: &str) -> Option<String> {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'%' {
            let hex = std::str::from_utf8(b.get(i + 1..i + 3)?).ok()?;
            out.push(u8::from_str_radix(hex, 16).ok()?);
            i += 3;
        } else {
            out.push(b[i]);
            i += 1;
        }
    }
    String::from_utf8(out).ok()
}

/// `!size`: digits and an optional unit k, m, g, t (powers of 1024, RFC 7489 §6.4).
fn parse_size(s: &str) -> Option<u64> {
    let s = s.trim();
    let (digits, unit) = match s.find(|c: char| !c.is_ascii_digit()) {
        Some(i) => s.split_at(i),
        None => (s, ""),
    };
    let n: u64 = digits.parse().ok()?;
    let mult: u64 = match unit.to_ascii_lowercase().as_str() {
        "" => 1,
        "k" => 1 << 10,
        "m" => 1 << 20,
        "g" => 1 << 30,
        "t" => 1 << 40,
        _ => return None,
    };
    n.checked_mul(mult)
}

/// The usable `mailto:` destinations of a `rua=` value. Anything that could smuggle a
/// second address or an SMTP parameter (spaces, `<>`, quotes, controls, `?` headers
/// of the mailto URI) makes that URI unusable.
pub fn destinations(rua: &str) -> Vec<Destination> {
    let mut out: Vec<Destination> = Vec::new();
    for uri in rua.split(',') {
        let uri = uri.trim();
        let (uri, limit) = match uri.rsplit_once('!') {
            Some((u, size)) => match parse_size(size) {
                Some(n) => (u, Some(n)),
                None => continue,
            },
            None => (uri, None),
        };
        let Some((scheme, rest)) = uri.split_once(':') else {
            continue;
        };
        if !scheme.eq_ignore_ascii_case("mailto") {
            continue;
        }
        let Some(address) = percent_decode(rest) else {
            continue;
        };
        let Some((local, domain)) = address.rsplit_once('@') else {
            continue;
        };
        let bad = |c: char| {
            c.is_whitespace()
                || c.is_control()
                || matches!(c, '<' | '>' | '"' | '?' | ',' | ';' | '\\')
        };
        if local.is_empty() || domain.is_empty() || address.contains(bad) || address.len() > 254 {
            continue;
        }
        let address = format!(
            "{local}@{}",
            domain.trim_end_matches('.').to_ascii_lowercase()
        );
        if !out.iter().any(|d| d.address.eq_ignore_ascii_case(&address)) {
            out.push(Destination { address, limit });
        }
    }
    out
}

/// Whether `dest_domain` is the reporting domain or under it (no verification needed).
pub fn internal(report_domain: &str, dest_domain: &str) -> bool {
    let (r, d) = (
        report_domain.trim_end_matches('.').to_ascii_lowercase(),
        dest_domain.trim_end_matches('.').to_ascii_lowercase(),
    );
    d == r || d.ends_with(&format!(".{r}"))
}

/// What the verification lookup said.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verified {
    Yes,
    No,
    /// DNS failed: ask again at the next attempt.
    Unknown,
}

/// RFC 7489 §7.1: a `v=DMARC1` TXT record at `<report>._report._dmarc.<dest>`.
pub async fn verify(resolver: &TokioResolver, report_domain: &str, dest_domain: &str) -> Verified {
    if internal(report_domain, dest_domain) {
        return Verified::Yes;
    }
    let name = format!(
        "{}._report._dmarc.{}.",
        report_domain.trim_end_matches('.'),
        dest_domain.trim_end_matches('.')
    );
    match resolver.lookup(name.as_str(), RecordType::TXT).await {
        Ok(lookup) => {
            let confirmed = lookup.answers().iter().any(|r| match &r.data {
                RData::TXT(txt) => {
                    let text: Vec<u8> = txt.txt_data.iter().flatten().copied().collect();
                    let text = String::from_utf8_lossy(&text);
                    let text = text.trim_start();
                    text.get(..8)
                        .is_some_and(|v| v.eq_ignore_ascii_case("v=DMARC1"))
                        && text[8..].trim_start().is_empty_or_semicolon()
                }
                _ => false,
            });
            if confirmed {
                Verified::Yes
            } else {
                Verified::No
            }
        }
        Err(NetError::Dns(DnsError::NoRecordsFound(_))) => Verified::No,
        Err(e) => {
            tracing::info!(name = %name, error = %e, "DMARC report destination check failed (DNS)");
            Verified::Unknown
        }
    }
}

trait EmptyOrSemicolon {
    fn is_empty_or_semicolon(&self) -> bool;
}

impl EmptyOrSemicolon for str {
    fn is_empty_or_semicolon(&self) -> bool {
        self.is_empty() || self.starts_with(';')
    }
}

/// RFC 5322 date-time in UTC, from seconds since the epoch.
pub fn rfc5322_date(secs: u64) -> String {
    use crate::wire::trace::{MONTHS, WEEKDAYS, civil_from_days};
    let days = (secs / 86_400) as i64;
    let rem = secs % 86_400;
    let (year, month, day) = civil_from_days(days);
    format!(
        "{}, {day:02} {} {year} {:02}:{:02}:{:02} +0000",
        WEEKDAYS[days.rem_euclid(7) as usize],
        MONTHS[(month - 1) as usize],
        rem / 3600,
        rem % 3600 / 60,
        rem % 60
    )
}

/// Who sends the reports.
pub struct Sender<'a> {
    pub org_name: &'a str,
    pub email: &'a str,
    pub hostname: &'a str,
}

impl Sender<'_> {
    /// The receiver domain of the file name and the `Submitter:` of the subject.
    fn submitter(&self) -> &str {
        self.email
            .rsplit_once('@')
            .map_or(self.hostname, |(_, d)| d)
    }
}

/// The attachment's file name (RFC 7489 §7.2.1.1):
/// `receiver "!" policy-domain "!" begin "!" end "!" unique-id ".xml.gz"`.
pub fn filename(sender: &Sender<'_>, r: &StoredReport) -> String {
    format!(
        "{}!{}!{}!{}!{}.xml.gz",
        sender.submitter(),
        r.domain,
        r.begin,
        r.end,
        r.id
    )
}

/// The report message (CRLF lines): multipart/mixed, a short text part and the gzip
/// attachment in base64 (RFC 7489 §7.2.1.1: `Report Domain:` / `Submitter:` /
/// `Report-ID:` subject; RFC 9990 §2.5 keeps it).
pub fn message(sender: &Sender<'_>, r: &StoredReport, to: &[&str], now: u64) -> Vec<u8> {
    use base64::Engine;
    let boundary = format!("=_mailwarden_{}", r.id);
    let name = filename(sender, r);
    let b64 = base64::engine::general_purpose::STANDARD.encode(&r.xml_gz);
    let mut m = String::with_capacity(b64.len() + 2048);
    // org_name goes into the text part only: header fields stay ASCII without encoding.
    m.push_str(&format!("From: {}\r\n", sender.email));
    m.push_str(&format!("To: {}\r\n", to.join(", ")));
    m.push_str(&format!("Date: {}\r\n", rfc5322_date(now)));
    m.push_str(&format!(
        "Subject: Report Domain: {} Submitter: {} Report-ID: <{}>\r\n",
        r.domain,
        sender.submitter(),
        r.id
    ));
    m.push_str(&format!("Message-ID: <{}@{}>\r\n", r.id, sender.hostname));
    m.push_str("MIME-Version: 1.0\r\n");
    m.push_str(&format!(
        "Content-Type: multipart/mixed; boundary=\"{boundary}\"\r\n\r\n"
    ));
    m.push_str("This is a MIME-formatted message.\r\n\r\n");
    m.push_str(&format!("--{boundary}\r\nContent-Type: text/plain; charset=utf-8\r\nContent-Transfer-Encoding: 8bit\r\n\r\n"));
    m.push_str(&format!(
        "DMARC aggregate report from {} for {}: {} messages, {} to {} (UTC seconds).\r\n\r\n",
        sender.org_name.replace(['\r', '\n'], " "),
        r.domain,
        r.messages,
        r.begin,
        r.end
    ));
    m.push_str(&format!(
        "--{boundary}\r\nContent-Type: application/gzip; name=\"{name}\"\r\nContent-Transfer-Encoding: base64\r\nContent-Disposition: attachment; filename=\"{name}\"\r\n\r\n"
    ));
    for line in b64.as_bytes().chunks(76) {
        m.push_str(std::str::from_utf8(line).unwrap_or_default());
        m.push_str("\r\n");
    }
    m.push_str(&format!("--{boundary}--\r\n"));
    m.into_bytes()
}

/// How one attempt ended.
#[derive(Debug)]
pub enum Attempt {
    Sent(Vec<String>),
    /// Worth retrying (4xx, next hop down, verification DNS failed).
    Deferred(String),
    /// Retrying cannot help (5xx from the next hop).
    Refused(String),
    /// No destination may get it.
    Undeliverable(String),
}

/// Picks the destinations, builds the message and sends it in one transaction.
pub async fn send(
    resolver: &TokioResolver,
    hop: std::sync::Arc<NextHop>,
    sender: &Sender<'_>,
    r: &StoredReport,
    now: u64,
) -> Attempt {
    let mut ok = Vec::new();
    let mut notes = Vec::new();
    let mut unknown = false;
    let all = destinations(&r.rua);
    for d in &all {
        match verify(resolver, &r.domain, d.domain()).await {
            Verified::Yes => ok.push(d.clone()),
            Verified::No => notes.push(format!(
                "{}: not verified (no {}._report._dmarc.{} record)",
                d.address,
                r.domain,
                d.domain()
            )),
            Verified::Unknown => {
                unknown = true;
                notes.push(format!("{}: verification lookup failed", d.address));
            }
        }
    }
    // The size is the message's; the To: field depends on who gets it, so measure with
    // every candidate listed (never smaller than what is sent).
    let candidates: Vec<&str> = ok.iter().map(|d| d.address.as_str()).collect();
    let size = message(sender, r, &candidates, now).len() as u64;
    let (fits, too_big): (Vec<Destination>, Vec<Destination>) = ok
        .into_iter()
        .partition(|d| d.limit.is_none_or(|l| size <= l));
    notes.extend(
        too_big
            .iter()
            .map(|d| format!("{}: report of {size} bytes over its limit", d.address)),
    );
    if fits.is_empty() {
        let why = if all.is_empty() {
            "no mailto: destination in rua=".to_string()
        } else {
            notes.join("; ")
        };
        return if unknown {
            Attempt::Deferred(why)
        } else {
            Attempt::Undeliverable(why)
        };
    }
    let to: Vec<&str> = fits.iter().map(|d| d.address.as_str()).collect();
    let body = message(sender, r, &to, now);
    let from = MailFrom {
        address: sender.email.to_string(),
        size: body.len(),
        ..Default::default()
    };
    let rcpts: Vec<RcptTo<String>> = to
        .iter()
        .map(|a| RcptTo {
            address: a.to_string(),
            ..Default::default()
        })
        .collect();
    let client = ClientIdentity {
        addr: std::net::SocketAddr::from(([127, 0, 0, 1], 0)),
        helo: Some(sender.hostname.to_string()),
        esmtp: true,
        login: None,
    };
    let out = Message {
        client: &client,
        from: &from,
        rcpts: &rcpts,
        size: body.len(),
        headers: &[],
        parts: &[&body],
    };
    // A destination the next hop refuses is left out; the others still get the report.
    let sent = one_shot::send(hop, out, |rcpt, reply| {
        tracing::warn!(report = %r.id, rcpt = %rcpt.address, reply = %reply, "DMARC report destination refused by the next hop");
        true
    })
    .await;
    match sent {
        Ok(Sent::Delivered { accepted, .. }) => {
            Attempt::Sent(accepted.into_iter().map(|r| r.address).collect())
        }
        Ok(Sent::Refused(reply)) if reply.code >= 500 => Attempt::Refused(reply.to_string()),
        Ok(Sent::Refused(reply)) => Attempt::Deferred(reply.to_string()),
        Err(e) => Attempt::Deferred(e.to_string()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rua_destinations_sizes_and_smuggling() {
        let d = destinations(
            "mailto:agg@Example.COM!10m, https://x.test/r, mailto:a%40b@x.test, mailto:ext@reports.test!50k,mailto:agg@example.com",
        );
        assert_eq!(
            d,
            [
                Destination {
                    address: "agg@example.com".into(),
                    limit: Some(10 << 20)
                },
                Destination {
                    address: "a@b@x.test".into(),
                    limit: None
                },
                Destination {
                    address: "ext@reports.test".into(),
                    limit: Some(50 << 10)
                },
            ]
        );
        for bad in [
            "mailto:a@b.test>\r\nRCPT TO:<c@d.test",
            "mailto:a@b.test NOTIFY=NEVER",
            "mailto:a@b.test?subject=x",
            "mailto:<a@b.test>",
            "mailto:a@b.test!10x",
            "mailto:@b.test",
            "mailto:a%0d%0a@b.test",
        ] {
            assert!(
                destinations(bad).iter().all(|d| d.address.contains('@')
                    && !d.address.contains(['\r', '\n', ' ', '<', '>', '?'])),
                "{bad:?}"
            );
            assert!(
                destinations(bad).is_empty(),
                "{bad:?} gave {:?}",
                destinations(bad)
            );
        }
    }

    #[test]
    fn only_the_domain_itself_and_its_subdomains_skip_verification() {
        assert!(internal("example.com", "example.com"));
        assert!(internal("example.com", "reports.Example.com."));
        assert!(!internal("example.com", "badexample.com"));
        assert!(!internal("sub.example.com", "example.com"));
        assert!(!internal("example.com", "com"));
    }

    #[test]
    fn dates_are_rfc5322() {
        assert_eq!(rfc5322_date(0), "Thu, 01 Jan 1970 00:00:00 +0000");
        assert_eq!(rfc5322_date(951_782_400), "Tue, 29 Feb 2000 00:00:00 +0000");
        assert_eq!(
            rfc5322_date(1_796_342_399),
            "Thu, 03 Dec 2026 23:59:59 +0000"
        );
    }
}
