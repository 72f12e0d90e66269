//! `[[dkim.sign]]`: outbound DKIM signing, one entry per domain and selector (two entries
//! for one domain, an RSA and an Ed25519 key, sign every message twice: RFC 8463 §4's
//! dual signing, for receivers that do not know Ed25519 yet).

use std::path::PathBuf;
use std::time::Duration;

use serde::Deserialize;

/// `[dkim]`.
#[derive(Debug, Clone, Default, Deserialize, serde::Serialize)]
#[serde(deny_unknown_fields)]
pub struct DkimConfig {
    /// `[[dkim.sign]]`: the keys outbound mail is signed with.
    #[serde(default)]
    pub sign: Vec<SignConfig>,
}

/// One signing key for one domain.
#[derive(Debug, Clone, Deserialize, serde::Serialize)]
#[serde(deny_unknown_fields)]
pub struct SignConfig {
    /// `d=`: the From domain this key signs for (exact match; a subdomain needs its own
    /// entry, so that `d=` is always the very domain DMARC aligns with).
    pub domain: String,
    /// `s=`: the key record is at `<selector>._domainkey.<domain>`.
    pub selector: String,
    /// PEM private key: PKCS#8 RSA (2048 bits or more) or Ed25519, or PKCS#1 RSA.
    pub key_file: PathBuf,
    /// Header fields signed when present (From is always added).
    #[serde(default = "default_headers")]
    pub headers: Vec<String>,
    /// Header fields signed one time more than they occur ("oversigning"), so that no
    /// instance can be added after signing without breaking the signature (RFC 6376
    /// §8.15). From is always added.
    #[serde(default = "default_oversign")]
    pub oversign: Vec<String>,
    /// `c=` header/body: `relaxed/relaxed` (default; survives the whitespace and folding
    /// changes MTAs make), `simple/simple`, `relaxed/simple`, `simple/relaxed`; one word
    /// means that for the header and `simple` for the body (RFC 6376 §3.5).
    #[serde(default = "default_canonicalization")]
    pub canonicalization: String,
    /// `x=`: how long a signature stays valid after signing; "0s" (default): no `x=`.
    #[serde(default, with = "super::duration")]
    pub expiry: Duration,
}

/// Signed when present. Rspamd's and OpenDKIM's recommended lists, without the trace
/// fields (Received, Return-Path) that relays add and the list fields that mailing lists
/// rewrite on purpose.
pub const DEFAULT_SIGN_HEADERS: &[&str] = &[
    "From",
    "Sender",
    "Reply-To",
    "Subject",
    "Date",
    "Message-ID",
    "To",
    "Cc",
    "MIME-Version",
    "Content-Type",
    "Content-Transfer-Encoding",
    "Content-ID",
    "Content-Description",
    "In-Reply-To",
    "References",
    "Resent-Date",
    "Resent-From",
    "Resent-Sender",
    "Resent-To",
    "Resent-Cc",
    "Resent-Message-ID",
    "List-Id",
    "List-Help",
    "List-Unsubscribe",
    "List-Unsubscribe-Post",
    "List-Subscribe",
    "List-Post",
    "List-Owner",
    "List-Archive",
];

/// Oversigned: the fields a reader sees and trusts, which an attacker replaying a signed
/// message would most like to add a second copy of (a second From or Subject shown
/// instead of the signed one).
// The first eleven of the signed list, which is ordered so that they come first.
pub const DEFAULT_OVERSIGN_HEADERS: &[&str] = DEFAULT_SIGN_HEADERS.split_at(11).0;

pub const DEFAULT_CANONICALIZATION: &str = "relaxed/relaxed";

fn default_headers() -> Vec<String> {
    DEFAULT_SIGN_HEADERS.iter().map(|s| s.to_string()).collect()
}

fn default_oversign() -> Vec<String> {
    DEFAULT_OVERSIGN_HEADERS
        .iter()
        .map(|s| s.to_string())
        .collect()
}

fn default_canonicalization() -> String {
    DEFAULT_CANONICALIZATION.into()
}

/// Header or body canonicalization (RFC 6376 §3.4).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Canon {
    Simple,
    Relaxed,
}

/// `c=` as (header, body).
pub fn parse_canonicalization(s: &str) -> Result<(Canon, Canon), String> {
    let word = |w: &str| match w.trim() {
        "simple" => Ok(Canon::Simple),
        "relaxed" => Ok(Canon::Relaxed),
        other => Err(format!(
            "`{other}`: use simple or relaxed, as header/body (e.g. relaxed/relaxed)"
        )),
    };
    match s.split_once('/') {
        Some((h, b)) => Ok((word(h)?, word(b)?)),
        None => Ok((word(s)?, Canon::Simple)),
    }
}

/// RFC 6376 §3.1: a selector is a sub-domain (dot-separated labels of letters, digits
/// and hyphens); it is part of a DNS name, so nothing else may slip in.
fn valid_selector(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 63 * 2
        && s.split('.').all(|l| {
            !l.is_empty()
                && l.len() <= 63
                && !l.starts_with('-')
                && !l.ends_with('-')
                && l.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-')
        })
}

/// RFC 5322 §3.6.8 field name: printable ASCII without colon.
fn valid_field_name(s: &str) -> bool {
    !s.is_empty() && s.bytes().all(|b| (33..=126).contains(&b) && b != b':')
}

impl DkimConfig {
    /// Every `[[dkim.sign]]` entry: syntax, and the key file itself (missing, unreadable,
    /// world-readable, too weak). Errors are (table, key, reason).
    pub fn validate(&self) -> Result<(), (String, String, String)> {
        for (i, s) in self.sign.iter().enumerate() {
            let t = format!("dkim.sign[{i}]");
            let err = |k: &str, r: String| Err((t.clone(), k.to_string(), r));
            let domain = s.domain.trim_end_matches('.');
            if !crate::wire::domain::looks_like_domain(domain) || domain.bytes().any(|b| b >= 0x80)
            {
                return err(
                    "domain",
                    format!(
                        "{:?} is not a domain name (internationalized names in A-label form: xn--...)",
                        s.domain
                    ),
                );
            }
            if !valid_selector(&s.selector) {
                return err(
                    "selector",
                    format!(
                        "{:?} is not a selector (letters, digits, '-', dot-separated)",
                        s.selector
                    ),
                );
            }
            if let Some(dup) = self.sign[..i].iter().position(|o| {
                o.domain.trim_end_matches('.').eq_ignore_ascii_case(domain)
                    && o.selector.eq_ignore_ascii_case(&s.selector)
            }) {
                return err(
                    "selector",
                    format!(
                        "{domain} selector {} is already dkim.sign[{dup}]",
                        s.selector
                    ),
                );
            }
            for (key, list) in [("headers", &s.headers), ("oversign", &s.oversign)] {
                if let Some(bad) = list.iter().find(|h| !valid_field_name(h)) {
                    return err(key, format!("{bad:?} is not a header field name"));
                }
            }
            if s.headers
                .iter()
                .chain(&s.oversign)
                .any(|h| h.eq_ignore_ascii_case("DKIM-Signature"))
            {
                return err(
                    "headers",
                    "DKIM-Signature cannot be signed by itself (RFC 6376 §3.5)".into(),
                );
            }
            if let Err(e) = parse_canonicalization(&s.canonicalization) {
                return err("canonicalization", e);
            }
            if !s.expiry.is_zero() && s.expiry < Duration::from_secs(3600) {
                return err(
                    "expiry",
                    "at least 1h (mail can wait in queues that long), or 0s for none".into(),
                );
            }
            if let Err(e) = crate::dkim_key::load(&s.key_file) {
                return err("key_file", e);
            }
        }
        Ok(())
    }
}
