//! One reporting domain's evaluations of one period → RFC 7489 Appendix C XML.
//!
//! Messages with the same source IP, identifiers, raw results, aligned results,
//! disposition and reasons share a `<record>` with their count. The schema's
//! constraints that matter here: `version` is required, `sp`, `pct` and `fo` are
//! required in `policy_published`, and `source_ip` must match the RFC's pattern, which
//! takes IPv6 only as eight uncompressed groups.

use std::collections::BTreeMap;
use std::io::Write;
use std::net::IpAddr;

use super::evaluation::{DkimResult, Evaluation, Override};

/// What the report says about us.
pub struct Reporter<'a> {
    pub org_name: &'a str,
    pub email: &'a str,
    pub extra_contact_info: &'a str,
}

/// The grouping key of a `<record>`.
#[derive(Debug, PartialEq, Eq, PartialOrd, Ord)]
struct RowKey {
    source_ip: String,
    header_from: String,
    envelope_to: String,
    disposition: String,
    dkim_aligned: bool,
    spf_aligned: bool,
    overrides: Vec<Override>,
    dkim: Vec<DkimResult>,
    spf: (String, String, String),
}

pub struct Built {
    pub xml: String,
    pub rows: u64,
    pub messages: u64,
}

/// XML-escapes text; drops what XML 1.0 cannot carry at all (controls but tab/LF/CR).
fn esc(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for c in s.chars() {
        match c {
            '&' => out.push_str("&amp;"),
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            '"' => out.push_str("&quot;"),
            '\'' => out.push_str("&apos;"),
            c if (c as u32) < 0x20 && !matches!(c, '\t' | '\n' | '\r') => {}
            '\u{FFFE}' | '\u{FFFF}' => {}
            c => out.push(c),
        }
    }
    out
}

/// The address as the schema's `IPAddress` pattern takes it: IPv4 dotted quad (also
/// for an IPv4-mapped IPv6 address), IPv6 as eight hexadecimal groups.
pub fn schema_ip(ip: IpAddr) -> String {
    match ip.to_canonical() {
        IpAddr::V4(v4) => v4.to_string(),
        IpAddr::V6(v6) => v6
            .segments()
            .iter()
            .map(|s| format!("{s:x}"))
            .collect::<Vec<_>>()
            .join(":"),
    }
}

fn el(out: &mut String, indent: &str, name: &str, value: &str) {
    out.push_str(&format!("{indent}<{name}>{}</{name}>\n", esc(value)));
}

/// Builds the report. `evaluations` must all be for one reporting domain; the policy
/// published is that of the latest one. At most `max_rows` records (the largest
/// counts first); the rest are summed in an `<error>` line.
pub fn build(
    reporter: &Reporter<'_>,
    report_id: &str,
    begin: u64,
    end: u64,
    evaluations: &[Evaluation],
    max_rows: usize,
) -> Option<Built> {
    let latest = evaluations.iter().max_by_key(|e| e.at)?;
    let mut rows: BTreeMap<RowKey, u64> = BTreeMap::new();
    for e in evaluations {
        let mut dkim = e.dkim.clone();
        dkim.sort();
        let mut overrides = e.overrides.clone();
        overrides.sort();
        let key = RowKey {
            source_ip: schema_ip(e.source_ip),
            header_from: e.header_from.clone(),
            envelope_to: e.envelope_to.clone(),
            disposition: e.disposition.clone(),
            dkim_aligned: e.dkim_aligned,
            spf_aligned: e.spf_aligned,
            overrides,
            dkim,
            spf: (
                e.spf_domain.clone(),
                e.spf_scope.clone(),
                e.spf_result.clone(),
            ),
        };
        *rows.entry(key).or_default() += 1;
    }
    let mut rows: Vec<(RowKey, u64)> = rows.into_iter().collect();
    // Stable: largest counts first, then the key order.
    rows.sort_by_key(|r| std::cmp::Reverse(r.1));
    let cut: u64 = rows.iter().skip(max_rows).map(|(_, n)| n).sum();
    rows.truncate(max_rows);

    let p = &latest.published;
    let mut x = String::with_capacity(1024 + rows.len() * 600);
    x.push_str("<?xml version=\"1.0\" encoding=\"UTF-8\"?>\n<feedback>\n");
    x.push_str("  <version>1.0</version>\n  <report_metadata>\n");
    el(&mut x, "    ", "org_name", reporter.org_name);
    el(&mut x, "    ", "email", reporter.email);
    if !reporter.extra_contact_info.is_empty() {
        el(
            &mut x,
            "    ",
            "extra_contact_info",
            reporter.extra_contact_info,
        );
    }
    el(&mut x, "    ", "report_id", report_id);
    x.push_str(&format!(
        "    <date_range>\n      <begin>{begin}</begin>\n      <end>{end}</end>\n    </date_range>\n"
    ));
    if cut > 0 {
        el(
            &mut x,
            "    ",
            "error",
            &format!(
                "{cut} messages in further rows left out (more than {max_rows} distinct rows)"
            ),
        );
    }
    x.push_str("  </report_metadata>\n  <policy_published>\n");
    el(&mut x, "    ", "domain", &p.domain);
    el(&mut x, "    ", "adkim", &p.adkim);
    el(&mut x, "    ", "aspf", &p.aspf);
    el(&mut x, "    ", "p", &p.p);
    el(&mut x, "    ", "sp", &p.sp);
    el(&mut x, "    ", "pct", &p.pct.to_string());
    el(&mut x, "    ", "fo", &p.fo);
    x.push_str("  </policy_published>\n");
    let word = |b: bool| if b { "pass" } else { "fail" };
    let mut messages = 0;
    for (k, count) in &rows {
        messages += count;
        x.push_str("  <record>\n    <row>\n");
        el(&mut x, "      ", "source_ip", &k.source_ip);
        el(&mut x, "      ", "count", &count.to_string());
        x.push_str("      <policy_evaluated>\n");
        el(&mut x, "        ", "disposition", &k.disposition);
        el(&mut x, "        ", "dkim", word(k.dkim_aligned));
        el(&mut x, "        ", "spf", word(k.spf_aligned));
        for o in &k.overrides {
            x.push_str("        <reason>\n");
            el(&mut x, "          ", "type", &o.kind);
            if !o.comment.is_empty() {
                el(&mut x, "          ", "comment", &o.comment);
            }
            x.push_str("        </reason>\n");
        }
        x.push_str("      </policy_evaluated>\n    </row>\n    <identifiers>\n");
        if !k.envelope_to.is_empty() {
            el(&mut x, "      ", "envelope_to", &k.envelope_to);
        }
        el(&mut x, "      ", "header_from", &k.header_from);
        x.push_str("    </identifiers>\n    <auth_results>\n");
        for d in &k.dkim {
            x.push_str("      <dkim>\n");
            el(&mut x, "        ", "domain", &d.domain);
            if !d.selector.is_empty() {
                el(&mut x, "        ", "selector", &d.selector);
            }
            el(&mut x, "        ", "result", &d.result);
            x.push_str("      </dkim>\n");
        }
        x.push_str("      <spf>\n");
        // The schema wants a domain; a null sender with an empty HELO has none.
        let spf_domain = if k.spf.0.is_empty() {
            "unknown"
        } else {
            &k.spf.0
        };
        el(&mut x, "        ", "domain", spf_domain);
        el(&mut x, "        ", "scope", &k.spf.1);
        el(&mut x, "        ", "result", &k.spf.2);
        x.push_str("      </spf>\n    </auth_results>\n  </record>\n");
    }
    x.push_str("</feedback>\n");
    Some(Built {
        xml: x,
        rows: rows.len() as u64,
        messages,
    })
}

/// gzip (RFC 1952), as RFC 7489 §7.2.1.1 asks for the attachment.
pub fn gzip(data: &[u8]) -> Vec<u8> {
    let mut enc = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::default());
    // Writing into a Vec cannot fail.
    let _ = enc.write_all(data);
    enc.finish().unwrap_or_default()
}

/// The XML back from the stored gzip (for `reports show`).
pub fn gunzip(data: &[u8]) -> std::io::Result<String> {
    use std::io::Read;
    let mut out = String::new();
    flate2::read::GzDecoder::new(data).read_to_string(&mut out)?;
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::dmarc_reports::recorder::tests::sample;

    fn reporter() -> Reporter<'static> {
        Reporter {
            org_name: "Org & <Co>",
            email: "dmarc@mx.test",
            extra_contact_info: "",
        }
    }

    #[test]
    fn groups_identical_messages_and_escapes_what_senders_control() {
        let mut a = sample("a.example");
        let b = a.clone();
        let mut c = a.clone();
        c.source_ip = "2001:db8::1".parse().unwrap();
        c.disposition = "reject".into();
        a.header_from = "a.example<evil>".into();
        let built = build(&reporter(), "id-1", 0, 86400, &[a, b.clone(), b, c], 100).unwrap();
        assert_eq!((built.rows, built.messages), (3, 4));
        assert!(built.xml.contains("<count>2</count>"));
        assert!(
            built
                .xml
                .contains("<org_name>Org &amp; &lt;Co&gt;</org_name>")
        );
        assert!(
            built
                .xml
                .contains("<header_from>a.example&lt;evil&gt;</header_from>")
        );
        assert!(
            built
                .xml
                .contains("<source_ip>2001:db8:0:0:0:0:0:1</source_ip>")
        );
        assert!(!built.xml.contains("<evil>"));
    }

    #[test]
    fn rows_past_the_limit_are_summed_in_an_error() {
        let evs: Vec<Evaluation> = (0..5u8)
            .map(|i| {
                let mut e = sample("a.example");
                e.source_ip = IpAddr::from([192, 0, 2, i]);
                e
            })
            .collect();
        let built = build(&reporter(), "id", 0, 1, &evs, 2).unwrap();
        assert_eq!((built.rows, built.messages), (2, 2));
        assert!(
            built
                .xml
                .contains("<error>3 messages in further rows left out")
        );
    }

    #[test]
    fn mapped_addresses_are_ipv4_and_gzip_round_trips() {
        assert_eq!(schema_ip("::ffff:192.0.2.9".parse().unwrap()), "192.0.2.9");
        assert_eq!(gunzip(&gzip(b"<feedback/>")).unwrap(), "<feedback/>");
    }
}
