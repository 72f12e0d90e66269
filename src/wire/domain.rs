//! Domain-name text helpers shared by configuration checks, authentication and the
//! policy rules: syntax only, no DNS.

/// A syntactically plausible domain name: dotted labels of letters, digits, hyphens.
pub fn looks_like_domain(s: &str) -> bool {
    let s = s.trim_end_matches('.');
    s.contains('.')
        && s.len() <= 253
        && s.split('.').all(|l| {
            !l.is_empty()
                && l.len() <= 63
                && l.bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_' || b >= 0x80)
        })
}

/// `domain` equals one of `list` or is a subdomain of it (case-insensitive).
pub fn domain_in(domain: &str, list: &[String]) -> bool {
    let d = domain.trim_end_matches('.').to_ascii_lowercase();
    !d.is_empty()
        && list.iter().any(|want| {
            let w = want.trim_end_matches('.').to_ascii_lowercase();
            d == w || d.strip_suffix(&w).is_some_and(|p| p.ends_with('.'))
        })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn syntax_and_suffix_match() {
        assert!(looks_like_domain("mail.example.org."));
        assert!(!looks_like_domain("localhost") && !looks_like_domain("a..b"));
        assert!(!looks_like_domain(&format!("{}.org", "a".repeat(64))));
        assert!(domain_in("mail.Example.org.", &["example.org".into()]));
        // A suffix that is not a label boundary is another domain.
        assert!(!domain_in("badexample.org", &["example.org".into()]));
        assert!(!domain_in("", &["".into()]));
    }
}
