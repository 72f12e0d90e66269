//! Header sanity: the first stage of the verdict, before any check looks at the message.
//!
//! DMARC protects exactly one domain, the one in the From header field (RFC 7489 §3.1,
//! DMARCbis §4.4). A message whose author is ambiguous gives an attacker a choice: the
//! verifier evaluates one From while the reader's mail client shows another. So a
//! message must have exactly one From field (RFC 5322 §3.6: "from" occurs exactly once)
//! whose mailboxes all share one domain, and at most one Subject field (a subject prefix
//! on one of two would be hidden behind the other). Anything else is a [`Problem`] and
//! gets `[auth] malformed_from` (default: reject `550 5.7.1`).
//!
//! Parsing is cross-checked: mail-parser's mailbox count must match the `@` signs that
//! stand outside quoted strings and comments, so a display name written as a bare address
//! (`ceo@bank.example <x@attacker.example>`) cannot hide a second author.

use super::spoof;
use crate::auth::headers::Field;

/// The author of a message that passed the sanity stage.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Author {
    /// The one From domain: lowercase, no trailing dot. DMARC evaluates this domain.
    pub domain: String,
    /// Every mailbox of the From field: (display name, address).
    pub mailboxes: Vec<(String, String)>,
}

/// Why a message's header section cannot be judged.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Problem {
    /// No From field at all.
    NoFrom,
    /// More than one From field (their count).
    SeveralFromFields(usize),
    /// One From field whose mailboxes are in different domains.
    SeveralDomains(Vec<String>),
    /// A From field with no mailbox we can read unambiguously.
    UnreadableFrom,
    /// More than one Subject field (their count).
    SeveralSubjects(usize),
}

impl Problem {
    /// A stable word for metrics, the trace and `check --json`.
    pub fn as_str(&self) -> &'static str {
        match self {
            Problem::NoFrom => "no-from",
            Problem::SeveralFromFields(_) => "several-from-fields",
            Problem::SeveralDomains(_) => "several-from-domains",
            Problem::UnreadableFrom => "unreadable-from",
            Problem::SeveralSubjects(_) => "several-subjects",
        }
    }

    /// The text the sender reads in the SMTP reply (no attacker-chosen text in it).
    pub fn reply_text(&self) -> String {
        match self {
            Problem::NoFrom => "Message has no From header field (RFC 5322 section 3.6)".into(),
            Problem::SeveralFromFields(n) => format!(
                "Message has {n} From header fields; exactly one is allowed (RFC 5322 section 3.6)"
            ),
            Problem::SeveralDomains(d) => format!(
                "From header field names {} domains; one author domain is required (DMARC)",
                d.len()
            ),
            Problem::UnreadableFrom => {
                "From header field cannot be parsed unambiguously (RFC 5322 section 3.6.2)".into()
            }
            Problem::SeveralSubjects(n) => format!(
                "Message has {n} Subject header fields; at most one is allowed (RFC 5322 section 3.6)"
            ),
        }
    }
}

/// The sanity stage: the author of the message, or what is wrong with its header.
pub fn check(fields: &[Field<'_>]) -> Result<Author, Problem> {
    let named = |name: &'static str| {
        fields
            .iter()
            .filter(move |f| f.name.eq_ignore_ascii_case(name))
    };
    let subjects = named("Subject").count();
    let froms: Vec<&Field<'_>> = named("From").collect();
    let author = match froms.as_slice() {
        [] => return Err(Problem::NoFrom),
        [from] => author(&from.value)?,
        several => return Err(Problem::SeveralFromFields(several.len())),
    };
    if subjects > 1 {
        return Err(Problem::SeveralSubjects(subjects));
    }
    Ok(author)
}

/// Every mailbox of one From field value, all in one domain.
fn author(value: &str) -> Result<Author, Problem> {
    let mailboxes = spoof::parse_from_mailboxes(value);
    if mailboxes.is_empty() || mailboxes.len() != unquoted_at_signs(value) {
        return Err(Problem::UnreadableFrom);
    }
    let mut domains: Vec<String> = Vec::new();
    for (_, address) in &mailboxes {
        let domain = mailbox_domain(address).ok_or(Problem::UnreadableFrom)?;
        if !domains.contains(&domain) {
            domains.push(domain);
        }
    }
    if domains.len() > 1 {
        return Err(Problem::SeveralDomains(domains));
    }
    Ok(Author {
        domain: domains.remove(0),
        mailboxes,
    })
}

/// The domain of a mailbox address as DMARC looks it up: lowercase, no trailing dot.
/// `None` for an address with no local part or domain, or a domain literal (no DNS name,
/// so nothing to evaluate).
fn mailbox_domain(address: &str) -> Option<String> {
    let (local, domain) = address.rsplit_once('@')?;
    let domain = domain.trim_end_matches('.').to_lowercase();
    let valid = !local.is_empty()
        && !domain.is_empty()
        && !domain.starts_with('[')
        && domain
            .chars()
            .all(|c| c.is_alphanumeric() || matches!(c, '.' | '-' | '_'));
    valid.then_some(domain)
}

/// Counts the `@` signs of a header value that are outside quoted strings and comments:
/// one per mailbox in a well-formed address list (an obsolete source route `<@a,@b:x@y>`
/// would count more, and is refused with the rest of the ambiguous forms).
fn unquoted_at_signs(value: &str) -> usize {
    let (mut count, mut depth, mut quoted, mut escaped) = (0, 0usize, false, false);
    for c in value.chars() {
        if escaped {
            escaped = false;
            continue;
        }
        match c {
            '\\' if quoted || depth > 0 => escaped = true,
            '"' if depth == 0 => quoted = !quoted,
            '(' if !quoted => depth += 1,
            ')' if !quoted => depth = depth.saturating_sub(1),
            '@' if !quoted && depth == 0 => count += 1,
            _ => {}
        }
    }
    count
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::auth::headers::fields;

    fn judge(header: &str) -> Result<Author, Problem> {
        let msg = format!("{header}To: x@example.org\r\n\r\nbody\r\n");
        check(&fields(msg.as_bytes()))
    }

    #[test]
    fn one_author_passes() {
        let a = judge("From: Boss <Boss@Bank.Example.>\r\n").unwrap();
        assert_eq!(a.domain, "bank.example");
        assert_eq!(
            a.mailboxes,
            vec![("Boss".into(), "Boss@Bank.Example.".into())]
        );
        let a = judge("From: a@bank.example, \"B, x\" <b@BANK.example>\r\n").unwrap();
        assert_eq!(a.domain, "bank.example");
        assert_eq!(a.mailboxes.len(), 2);
        // Comments and quoted @ signs are not mailboxes.
        let a = judge("From: \"ceo@other.example\" (x@y) <ceo@bank.example>\r\n").unwrap();
        assert_eq!(a.domain, "bank.example");
        // Encoded display names and folding.
        let a = judge("From: =?UTF-8?Q?J=C3=BCrgen?=\r\n <j@bank.example>\r\n").unwrap();
        assert_eq!(a.mailboxes[0].0, "Jürgen");
    }

    #[test]
    fn ambiguous_authors_are_problems() {
        assert_eq!(judge(""), Err(Problem::NoFrom));
        assert_eq!(
            judge("From: ceo@bank.example\r\nfrom: x@attacker.example\r\n"),
            Err(Problem::SeveralFromFields(2))
        );
        // Whitespace before the colon is the obsolete syntax of the same field.
        assert_eq!(
            judge("From: x@attacker.example\r\nFROM : ceo@bank.example\r\n"),
            Err(Problem::SeveralFromFields(2))
        );
        assert_eq!(
            judge("From: x@attacker.example, Boss <boss@bank.example>\r\n"),
            Err(Problem::SeveralDomains(vec![
                "attacker.example".into(),
                "bank.example".into()
            ]))
        );
        for unreadable in [
            "From: \r\n",
            "From: undisclosed-recipients:;\r\n",
            "From: ceo\r\n",
            "From: ceo@bank.example <x@attacker.example>\r\n",
            "From: <@relay.example:ceo@bank.example>\r\n",
            "From: ceo@[192.0.2.1]\r\n",
        ] {
            assert_eq!(
                judge(unreadable),
                Err(Problem::UnreadableFrom),
                "{unreadable}"
            );
        }
        assert_eq!(
            judge("From: a@bank.example\r\nSubject: one\r\nSubject: two\r\n"),
            Err(Problem::SeveralSubjects(2))
        );
    }

    #[test]
    fn reply_texts_are_fixed() {
        let p = Problem::SeveralDomains(vec!["a\r\nb".into()]);
        assert!(!p.reply_text().contains('\n'));
    }
}
