//! Outbound DKIM signing (RFC 6376; Ed25519: RFC 8463): mail from submission listeners,
//! and outbound quarantine entries when they are released, leave signed by the domain of
//! their From header, the domain DMARC aligns with.
//!
//! Runs after the From check and the burst stage and after the verdict, on the message as
//! it will be relayed (edits applied, our added header fields on top); the signature
//! header fields are prepended. The body is never copied: only the header section is
//! gathered in one piece to be read.

pub mod cli;
/// Key files live at the bottom (`crate::dkim_key`): the configuration checks them too.
pub use crate::dkim_key as key;

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use mail_auth::common::crypto::{Algorithm as DkimAlgorithm, DkimKey, Sha256, SigningKey};
use mail_auth::common::headers::{HeaderWriter, Writable};
use mail_auth::dkim::{Canonicalization, DkimSigner};

use crate::config::dkim_sign::{Canon, DkimConfig, SignConfig, parse_canonicalization};

/// One key of one domain, ready to sign.
struct DomainKey {
    selector: String,
    key: SharedKey,
    headers: Vec<String>,
    oversign: Vec<String>,
    canon: (Canonicalization, Canonicalization),
    expiry: Duration,
}

/// mail-auth's signer takes its key by value; every message's signer shares the one
/// loaded key through this.
#[derive(Clone)]
struct SharedKey(Arc<DkimKey>);

impl SigningKey for SharedKey {
    type Hasher = Sha256;

    fn sign(&self, input: impl Writable) -> mail_auth::Result<Vec<u8>> {
        self.0.sign(input)
    }

    fn algorithm(&self) -> DkimAlgorithm {
        self.0.algorithm()
    }
}

/// Every configured key, by lower-case domain.
pub struct Signer {
    domains: HashMap<String, Vec<DomainKey>>,
}

/// What signing did to one message (for the log line and the metric).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Signing {
    /// Signed: DKIM-Signature header fields to put on top, one per key.
    Signed {
        domain: String,
        selectors: Vec<String>,
        headers: Vec<String>,
    },
    /// The From domain has no key: relayed unsigned.
    NoKey { domain: String },
    /// No single From domain to sign for (no From, several, unparsable): relayed
    /// unsigned; DMARC could not align any signature for it anyway.
    NoFromDomain,
    /// A key failed to sign (should not happen with a key that loaded): unsigned.
    Failed { domain: String, error: String },
}

impl Signing {
    /// The metric label.
    pub fn result(&self) -> &'static str {
        match self {
            Signing::Signed { .. } => "signed",
            Signing::NoKey { .. } => "no_key",
            Signing::NoFromDomain => "no_from_domain",
            Signing::Failed { .. } => "failed",
        }
    }

    /// Header fields to prepend (none unless signed).
    pub fn headers(&self) -> &[String] {
        match self {
            Signing::Signed { headers, .. } => headers,
            _ => &[],
        }
    }

    /// One line for the transaction log.
    pub fn summary(&self) -> String {
        match self {
            Signing::Signed {
                domain, selectors, ..
            } => format!("signed d={domain} s={}", selectors.join(",")),
            Signing::NoKey { domain } => format!("unsigned: no key for {domain}"),
            Signing::NoFromDomain => "unsigned: no single From domain".into(),
            Signing::Failed { domain, error } => {
                format!("unsigned: signing for {domain} failed: {error}")
            }
        }
    }
}

/// Counts the result (metric `mailwarden_dkim_signing`) and logs what was not signed.
pub fn record(signing: Signing) -> Signing {
    crate::metrics::global()
        .dkim_signing
        .get_or_create(&crate::metrics::label("result", signing.result()))
        .inc();
    match &signing {
        Signing::Failed { .. } => {
            tracing::warn!(dkim_sign = %signing.summary(), "dkim: signing failed, relayed unsigned")
        }
        Signing::Signed { .. } => {}
        _ => tracing::debug!(dkim_sign = %signing.summary(), "dkim: relayed unsigned"),
    }
    signing
}

fn canon(c: Canon) -> Canonicalization {
    match c {
        Canon::Simple => Canonicalization::Simple,
        Canon::Relaxed => Canonicalization::Relaxed,
    }
}

impl Signer {
    /// Loads every `[[dkim.sign]]` key; `None` when there are none.
    pub fn from_config(config: &DkimConfig) -> Result<Option<Arc<Signer>>, String> {
        if config.sign.is_empty() {
            return Ok(None);
        }
        let mut domains: HashMap<String, Vec<DomainKey>> = HashMap::new();
        for (i, s) in config.sign.iter().enumerate() {
            let loaded =
                key::load(&s.key_file).map_err(|e| format!("dkim.sign[{i}]: key_file: {e}"))?;
            domains
                .entry(s.domain.trim_end_matches('.').to_ascii_lowercase())
                .or_default()
                .push(Self::domain_key(s, loaded)?);
        }
        Ok(Some(Arc::new(Signer { domains })))
    }

    fn domain_key(s: &SignConfig, loaded: key::SigningKey) -> Result<DomainKey, String> {
        let (h, b) = parse_canonicalization(&s.canonicalization)?;
        // From is always signed and oversigned (RFC 6376 §5.4: From must be signed).
        let with_from = |list: &[String]| {
            let mut out = vec!["From".to_string()];
            out.extend(
                list.iter()
                    .filter(|n| !n.eq_ignore_ascii_case("From"))
                    .cloned(),
            );
            out
        };
        Ok(DomainKey {
            selector: s.selector.to_ascii_lowercase(),
            key: SharedKey(loaded.key),
            headers: with_from(&s.headers),
            oversign: with_from(&s.oversign),
            canon: (canon(h), canon(b)),
            expiry: s.expiry,
        })
    }

    /// A signer with one key, for tests and benchmarks.
    pub fn single(s: &SignConfig, loaded: key::SigningKey) -> Result<Signer, String> {
        let mut domains = HashMap::new();
        domains.insert(
            s.domain.to_ascii_lowercase(),
            vec![Self::domain_key(s, loaded)?],
        );
        Ok(Signer { domains })
    }

    /// Signs the message that will be relayed as `added` header lines (ours, on top)
    /// followed by `parts` (the message with its edits, see `relay::writer::edited`).
    pub fn sign(&self, added: &[String], parts: &[&[u8]]) -> Signing {
        let (head, body) = split_header_section(added, parts);
        let fields = crate::auth::headers::fields(&head);
        let Some(domain) = from_domain(&fields) else {
            return Signing::NoFromDomain;
        };
        let Some(keys) = self.domains.get(&domain) else {
            return Signing::NoKey { domain };
        };
        let present: Vec<&str> = fields.iter().map(|f| f.name).collect();
        let mut headers = Vec::with_capacity(keys.len());
        let mut selectors = Vec::with_capacity(keys.len());
        for k in keys {
            match sign_one(k, &domain, &present, &head, &body) {
                Ok(h) => {
                    headers.push(h);
                    selectors.push(k.selector.clone());
                }
                Err(error) => return Signing::Failed { domain, error },
            }
        }
        Signing::Signed {
            domain,
            selectors,
            headers,
        }
    }
}

/// The `h=` list for this message: each configured field that is present (mail-auth
/// signs every instance of a listed name), and each oversigned field once more, so one
/// extra, empty instance is signed (absent fields: one empty instance).
fn header_list(k: &DomainKey, present: &[&str]) -> Vec<String> {
    let is_present = |n: &str| present.iter().any(|p| p.eq_ignore_ascii_case(n));
    let mut list: Vec<String> = k
        .headers
        .iter()
        .filter(|n| is_present(n) && !k.oversign.iter().any(|o| o.eq_ignore_ascii_case(n)))
        .cloned()
        .collect();
    for o in &k.oversign {
        // A name listed twice: mail-auth matches the message's instances to the first
        // and adds the second, unmatched, as the empty extra instance.
        if is_present(o) {
            list.push(o.clone());
        }
        list.push(o.clone());
    }
    list
}

fn sign_one(
    k: &DomainKey,
    domain: &str,
    present: &[&str],
    head: &[u8],
    body: &[u8],
) -> Result<String, String> {
    let mut signer = DkimSigner::from_key(k.key.clone())
        .domain(domain)
        .selector(&k.selector)
        .headers(header_list(k, present))
        .header_canonicalization(k.canon.0)
        .body_canonicalization(k.canon.1);
    if !k.expiry.is_zero() {
        signer = signer.expiration(k.expiry.as_secs());
    }
    let signature = signer
        .sign_chained([head, body])
        .map_err(|e| e.to_string())?;
    Ok(signature
        .to_header()
        .trim_end_matches(['\r', '\n'])
        .to_string())
}

/// The single From domain (lower case, no trailing dot): every mailbox of every From
/// field must have the same domain, or there is nothing DMARC could align with.
fn from_domain(fields: &[crate::auth::headers::Field<'_>]) -> Option<String> {
    let mut found: Option<String> = None;
    for f in fields
        .iter()
        .filter(|f| f.name.eq_ignore_ascii_case("From"))
    {
        let boxes = crate::policy::spoof::parse_from_mailboxes(&f.value);
        if boxes.is_empty() {
            return None;
        }
        for (_, address) in boxes {
            let domain = address
                .rsplit_once('@')?
                .1
                .trim_end_matches('.')
                .to_ascii_lowercase();
            if domain.is_empty() || found.as_ref().is_some_and(|d| *d != domain) {
                return None;
            }
            found = Some(domain);
        }
    }
    found
}

/// The header section as one piece (our added lines first, CRLF-terminated, then the
/// message's header fields up to and excluding the empty line), and the rest: the empty
/// line and the body. The body is borrowed when it lies in one part, which it does: edits
/// only touch header fields.
fn split_header_section<'a>(
    added: &[String],
    parts: &[&'a [u8]],
) -> (Vec<u8>, std::borrow::Cow<'a, [u8]>) {
    let mut head = Vec::with_capacity(4096);
    for h in added
        .iter()
        .map(String::as_str)
        .chain(crate::relay::writer::orphan_fold_guard(added, parts))
    {
        head.extend_from_slice(h.as_bytes());
        if !head.ends_with(b"\r\n") {
            head.extend_from_slice(b"\r\n");
        }
    }
    let mut at_line_start = true;
    for (i, part) in parts.iter().enumerate() {
        let mut j = 0;
        while j < part.len() {
            if at_line_start && (part[j] == b'\n' || part[j..].starts_with(b"\r\n")) {
                head.extend_from_slice(&part[..j]);
                let rest = &parts[i + 1..];
                return if rest.is_empty() {
                    (head, std::borrow::Cow::Borrowed(&part[j..]))
                } else {
                    let mut owned = part[j..].to_vec();
                    rest.iter().for_each(|p| owned.extend_from_slice(p));
                    (head, std::borrow::Cow::Owned(owned))
                };
            }
            at_line_start = part[j] == b'\n';
            j += 1;
        }
        head.extend_from_slice(part);
    }
    (head, std::borrow::Cow::Borrowed(&[]))
}

#[cfg(test)]
mod tests;
