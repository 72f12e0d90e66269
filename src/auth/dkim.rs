//! DKIM verification (RFC 6376 §3 to §6, RFC 8301, RFC 8463), one result per
//! DKIM-Signature field, on top of mail-auth's parsing, canonicalization and crypto.
//!
//! mail-auth's `verify_dkim` passes signatures that RFC 6376 says must not verify (one
//! whose `h=` leaves From out; a key record whose `h=`, `s=` or `v=` rules it out), drops
//! the domain of every signature it cannot parse, and refuses `l=` signatures outright
//! (and hashes `l=` octets of the raw body where RFC 6376 §3.5 counts them after
//! canonicalization). So the orchestration is ours: we read every tag list ourselves
//! ([`tag_list`]), fetch and judge key records ourselves ([`KeyRecord::parse`], our own
//! TTL cache), compute `l=` body hashes ourselves, and call mail-auth only for what it
//! does well: `Signature::parse`, the full-body hashes it computed while parsing,
//! `signed_headers` (which header instances `h=` selects) and the key's `verify`
//! (header canonicalization and the RSA / Ed25519 check). mail-auth's ATPS (RFC 6541,
//! experimental) and failure-report lookups (RFC 6651) are not done: we report to no one,
//! and they were DNS lookups a sender could make us do.
//!
//! Result words (RFC 8601 §2.7.1), decided in this order:
//!
//! | word | when |
//! | --- | --- |
//! | `permerror` | the tag list is malformed (syntax, a duplicate tag, a missing required tag, `v=` not `1`); `h=` does not name From (§5.4, §6.1.1); `i=` is not `d=` or a subdomain of it; `x=` is not after `t=`, or has passed; `t=` is more than [`CLOCK_SKEW`] in the future; `l=` is longer than the body; no key (NXDOMAIN, no TXT, no usable record); the key record is malformed, revoked (`p=` empty), not for email (`s=`), of another type than `a=` (`k=`), forbids the hash (`h=`), is strict (`t=s`) while `i=`'s domain is not exactly `d=`, or is an RSA key under 1024 bits (RFC 8301 §3.2); the per-message DNS lookup limit was reached |
//! | `fail` | `a=rsa-sha1` (RFC 8301 §3.1: never valid; not even looked up); the body hash differs; the signature does not verify |
//! | `temperror` | the key lookup failed for a DNS reason (SERVFAIL, timeout) or ran out of the time budget |
//! | `policy` | it verifies, but `l=` leaves octets after the signed length unsigned: someone may have appended content. Never counts as pass (DMARC alignment, `dkim_aggregate`) |
//! | `pass` | it verifies and covers the whole body (with or without `l=`); a key in testing mode (`t=y`) says so in the reason and changes nothing else |

use std::borrow::Cow;
use std::cell::Cell;
use std::ops::Range;
use std::sync::Arc;
use std::time::{SystemTime, UNIX_EPOCH};

use aws_lc_rs::signature::{ParsedPublicKey, RSA_PKCS1_1024_8192_SHA256_FOR_LEGACY_USE_ONLY};
use hickory_resolver::proto::rr::{Name, RData, RecordType};
use mail_auth::AuthenticatedMessage;
use mail_auth::common::crypto::{Algorithm, HashAlgorithm};
use mail_auth::common::headers::{Writable, Writer};
use mail_auth::common::parse::TxtRecordParser;
use mail_auth::common::verify::DomainKey;
use mail_auth::dkim::{Canonicalization, Signature};
use tokio::time::Instant;

use super::budget::{DnsBudget, LIMIT_REASON};
use super::cache::TtlCache;
use super::dns::DnsClient;
use super::{AuthResult, DkimCheck};

/// How far in the future a signature's `t=` may be before it is refused: 5 minutes, the
/// clock drift OpenDKIM allows by default. Clocks of signers and verifiers drift;
/// RFC 6376 §3.5 lets a verifier refuse a future timestamp and sets no number.
pub const CLOCK_SKEW: u64 = 300;

/// Smallest RSA key that may verify (RFC 8301 §3.2).
pub const MIN_RSA_BITS: usize = 1024;

/// Parsed key records by query name (`selector._domainkey.domain.`), for the TTL of
/// the TXT answer: the usable record or why the answer is unusable. DNS errors and
/// "no such record" are not kept (hickory's own cache keeps negative answers).
pub type KeyCache = TtlCache<Box<str>, Result<Arc<KeyRecord>, String>>;

/// What verification needs besides the message.
pub struct Context<'a> {
    pub dns: &'a DnsClient,
    pub keys: &'a KeyCache,
    pub budget: &'a DnsBudget,
    /// When the whole verification must be done: a key lookup not finished by then is
    /// `temperror`.
    pub deadline: Instant,
    /// DKIM-Signature fields looked at; later ones are ignored.
    pub max_signatures: usize,
}

/// Verifies the first `ctx.max_signatures` DKIM-Signature fields of `message`, in
/// header order: one [`DkimCheck`] each, also for the malformed ones.
pub async fn verify(ctx: &Context<'_>, message: &AuthenticatedMessage<'_>) -> Vec<DkimCheck> {
    let now = unix_now();
    let mut memo = KeyMemo::default();
    let mut bodies = BodyHashes::new(message);
    let mut out = Vec::new();
    for (name, value) in message
        .headers
        .iter()
        .filter(|(name, _)| name.trim_ascii().eq_ignore_ascii_case(b"DKIM-Signature"))
        .take(ctx.max_signatures)
    {
        let field = Field { name, value };
        out.push(verify_one(ctx, message, &field, now, &mut memo, &mut bodies).await);
    }
    out
}

/// One DKIM-Signature field as it appears in the message (value with its folding).
struct Field<'a> {
    name: &'a [u8],
    value: &'a [u8],
}

async fn verify_one(
    ctx: &Context<'_>,
    message: &AuthenticatedMessage<'_>,
    field: &Field<'_>,
    now: u64,
    memo: &mut KeyMemo,
    bodies: &mut BodyHashes<'_>,
) -> DkimCheck {
    let tags = tag_list(field.value);
    let mut check = identity(&tags);
    // mail-auth parsed the signatures it accepted (those without l=) already.
    let parsed = message
        .dkim_headers
        .iter()
        .find(|h| std::ptr::eq(h.value, field.value))
        .map(|h| &h.header);
    let sig = match precheck(&tags, field.value, parsed, now) {
        Ok(sig) => sig,
        Err(e) => return e.into_check(check),
    };
    check.domain = sig.sig.d.to_ascii_lowercase();
    check.selector = sig.sig.s.clone();
    let Some(qname) = key_name(&sig.sig) else {
        return Verdict::perm("d= or s= is not a domain name").into_check(check);
    };
    let (fetched, stale_secs) = memo.fetch(ctx, &qname).await;
    check.stale_secs = stale_secs;
    let key = match fetched {
        Fetched::Key(key) => key,
        Fetched::Perm(reason) => return Verdict::Perm(reason).into_check(check),
        Fetched::Temp(reason) => return Verdict::Temp(reason).into_check(check),
    };
    match verify_with_key(message, field, &sig, &key, bodies) {
        Ok(outcome) => {
            check.result = outcome.result;
            check.reason = outcome.reason;
            check
        }
        Err(e) => e.into_check(check),
    }
}

/// `d=`, `s=` and `a=` as far as the raw tag list shows them: kept on every result,
/// also for a signature that cannot be parsed.
fn identity(tags: &TagList<'_>) -> DkimCheck {
    let text = |name: &str| {
        tags.get(name)
            .map(|t| String::from_utf8_lossy(t.value).into_owned())
            .unwrap_or_default()
    };
    let a = text("a").to_ascii_lowercase();
    DkimCheck {
        result: AuthResult::PermError,
        domain: text("d").to_ascii_lowercase(),
        selector: text("s"),
        algorithm: match a.as_str() {
            "rsa-sha1" | "rsa-sha256" | "ed25519-sha256" => a,
            _ => String::new(),
        },
        reason: None,
        stale_secs: None,
    }
}

/// Why a signature does not pass, before it is mapped onto a result word.
#[derive(Debug, Clone, PartialEq)]
enum Verdict {
    Perm(String),
    Fail(String),
    Temp(String),
}

impl Verdict {
    fn perm(reason: impl Into<String>) -> Verdict {
        Verdict::Perm(reason.into())
    }

    fn into_check(self, mut check: DkimCheck) -> DkimCheck {
        let (result, reason) = match self {
            Verdict::Perm(r) => (AuthResult::PermError, r),
            Verdict::Fail(r) => (AuthResult::Fail, r),
            Verdict::Temp(r) => (AuthResult::TempError, r),
        };
        check.result = result;
        check.reason = Some(reason);
        check
    }
}

// ---------------------------------------------------------------------------------------
// Tag lists (RFC 6376 §3.2)
// ---------------------------------------------------------------------------------------

/// One `name=value` of a tag list.
#[derive(Debug, Clone)]
struct Tag<'a> {
    name: &'a str,
    /// The value without surrounding whitespace.
    value: &'a [u8],
    /// The bytes after `=` up to the `;` (or the end), surrounding whitespace included:
    /// what is deleted from `b=` before the header hash (§3.5, §3.7).
    span: Range<usize>,
}

/// A parsed tag list. On a syntax error the well-formed tags are still there (to keep
/// `d=` and `s=` in the result), and `error` says what is wrong.
#[derive(Debug)]
struct TagList<'a> {
    tags: Vec<Tag<'a>>,
    error: Option<String>,
}

impl<'a> TagList<'a> {
    fn get(&self, name: &str) -> Option<&Tag<'a>> {
        self.tags.iter().find(|t| t.name == name)
    }

    fn position(&self, name: &str) -> Option<usize> {
        self.tags.iter().position(|t| t.name == name)
    }
}

fn is_fws(b: u8) -> bool {
    matches!(b, b' ' | b'\t' | b'\r' | b'\n')
}

/// §3.2: `tag-spec *( ";" tag-spec ) [ ";" ]`, `tag-name = ALPHA *( ALPHA / DIGIT /
/// "_" )`, names case-sensitive. A duplicate name makes the whole list invalid. Empty
/// specs are allowed only at the end (a trailing `;`), as dkimpy does.
fn tag_list(text: &[u8]) -> TagList<'_> {
    // Sized up front: this runs for every signature and key record.
    let count = memchr::memchr_iter(b';', text).count() + 1;
    let mut list = TagList {
        tags: Vec::with_capacity(count),
        error: None,
    };
    let fail = |list: &mut TagList<'_>, e: String| {
        list.error.get_or_insert(e);
    };
    let last = count - 1;
    let mut next_start = 0;
    for (n, bytes) in text.split(|&b| b == b';').enumerate() {
        let start = next_start;
        next_start += bytes.len() + 1;
        if bytes.iter().all(|&b| is_fws(b)) {
            if n != last {
                fail(&mut list, "empty tag".into());
            }
            continue;
        }
        let Some(eq) = bytes.iter().position(|&b| b == b'=') else {
            fail(&mut list, "tag without '='".into());
            continue;
        };
        let name = trim_fws(&bytes[..eq]);
        let valid_name = name.first().is_some_and(u8::is_ascii_alphabetic)
            && name.iter().all(|b| b.is_ascii_alphanumeric() || *b == b'_');
        let Some(name) = std::str::from_utf8(name).ok().filter(|_| valid_name) else {
            fail(&mut list, "invalid tag name".into());
            continue;
        };
        if list.get(name).is_some() {
            fail(&mut list, format!("duplicate tag {name}="));
            continue;
        }
        list.tags.push(Tag {
            name,
            value: trim_fws(&bytes[eq + 1..]),
            span: start + eq + 1..start + bytes.len(),
        });
    }
    list
}

fn trim_fws(mut b: &[u8]) -> &[u8] {
    while let [first, rest @ ..] = b
        && is_fws(*first)
    {
        b = rest;
    }
    while let [rest @ .., last] = b
        && is_fws(*last)
    {
        b = rest;
    }
    b
}

/// A colon-separated list value (`h=`, `s=`, `t=` of a key record), items trimmed.
fn items(value: &[u8]) -> impl Iterator<Item = &[u8]> {
    value.split(|&b| b == b':').map(trim_fws)
}

/// An unsigned decimal of at most `max_digits` digits (§3.5: `t=`/`x=` 1*12DIGIT,
/// `l=` 1*76DIGIT); a value past `u64` is `u64::MAX` (longer than any body).
fn number(value: &[u8], max_digits: usize) -> Option<u64> {
    if value.is_empty() || value.len() > max_digits || !value.iter().all(u8::is_ascii_digit) {
        return None;
    }
    Some(
        value
            .iter()
            .try_fold(0u64, |n, d| {
                n.checked_mul(10)?.checked_add(u64::from(d - b'0'))
            })
            .unwrap_or(u64::MAX),
    )
}

// ---------------------------------------------------------------------------------------
// The signature alone (§3.5, §6.1.1)
// ---------------------------------------------------------------------------------------

/// A signature that passed every check that needs no key.
struct Checked<'m> {
    sig: Cow<'m, Signature>,
    /// `l=`, when present (0 signs no body at all).
    length: Option<u64>,
    /// The span of the `b=` value in the field value.
    b_span: Range<usize>,
}

fn precheck<'m>(
    tags: &TagList<'_>,
    value: &[u8],
    parsed: Option<&'m Signature>,
    now: u64,
) -> Result<Checked<'m>, Verdict> {
    if let Some(e) = &tags.error {
        return Err(Verdict::Perm(format!("malformed signature: {e}")));
    }
    match tags.get("v").map(|t| t.value) {
        Some(b"1") => {}
        Some(_) => return Err(Verdict::perm("unsupported version (v= is not 1)")),
        None => return Err(Verdict::perm("malformed signature: no v=")),
    }
    for required in ["a", "b", "bh", "d", "h", "s"] {
        if tags.get(required).is_none_or(|t| t.value.is_empty()) {
            return Err(Verdict::Perm(format!(
                "malformed signature: no {required}="
            )));
        }
    }
    // q= (§3.5): a colon-separated list of query methods; "dns/txt" is the only one
    // defined, and a verifier "MUST" be able to use one of those listed. mail-auth
    // ignores q=, so `q=dns/foo` verified as if it said dns/txt.
    if let Some(q) = tags.get("q")
        && !String::from_utf8_lossy(q.value).split(':').any(|m| {
            m.split_whitespace()
                .collect::<String>()
                .eq_ignore_ascii_case("dns/txt")
        })
    {
        return Err(Verdict::perm(
            "no supported query method in q= (only dns/txt)",
        ));
    }
    // Numbers first, from the raw tags: mail-auth reads a malformed number as 0 ("no
    // limit", "no expiry") or misreads the tags after it.
    check_times(tags, now)?;
    let length = match tags.get("l") {
        Some(t) => Some(number(t.value, 76).ok_or_else(|| Verdict::perm("l= is not a number"))?),
        None => None,
    };
    let sig = match parsed {
        Some(sig) => Cow::Borrowed(sig),
        None => Cow::Owned(
            Signature::parse(value)
                .map_err(|e| Verdict::Perm(format!("malformed signature: {e}")))?,
        ),
    };
    if !sig.h.iter().any(|h| h.trim().eq_ignore_ascii_case("from")) {
        return Err(Verdict::perm("From not signed"));
    }
    if tags.get("i").is_some() && !within_domain(&sig.i, &sig.d) {
        return Err(Verdict::perm("i= is not within d="));
    }
    if sig.a == Algorithm::RsaSha1 {
        return Err(Verdict::Fail("rsa-sha1 is not accepted (RFC 8301)".into()));
    }
    let b_span = tags.get("b").map(|t| t.span.clone()).unwrap_or_default();
    Ok(Checked {
        sig,
        length,
        b_span,
    })
}

/// `i=`'s domain is `d=` or a subdomain of it (§3.5, §6.1.1).
fn within_domain(auid: &str, d: &str) -> bool {
    let Some((_, domain)) = auid.rsplit_once('@') else {
        return false;
    };
    let (domain, d) = (domain.to_ascii_lowercase(), d.to_ascii_lowercase());
    !d.is_empty() && (domain == d || domain.ends_with(&format!(".{d}")))
}

/// `t=` and `x=` (§3.5): numbers; `x=` after `t=` and not passed; `t=` not further in
/// the future than [`CLOCK_SKEW`].
fn check_times(tags: &TagList<'_>, now: u64) -> Result<(), Verdict> {
    let time = |name: &str| -> Result<Option<u64>, Verdict> {
        match tags.get(name) {
            Some(t) => number(t.value, 12)
                .map(Some)
                .ok_or_else(|| Verdict::Perm(format!("{name}= is not a number"))),
            None => Ok(None),
        }
    };
    let (t, x) = (time("t")?, time("x")?);
    if let (Some(t), Some(x)) = (t, x)
        && x <= t
    {
        return Err(Verdict::perm("x= is not after t="));
    }
    if let Some(x) = x
        && x < now
    {
        return Err(Verdict::perm("signature expired (x=)"));
    }
    if let Some(t) = t
        && t > now.saturating_add(CLOCK_SKEW)
    {
        return Err(Verdict::perm("t= is in the future"));
    }
    Ok(())
}

/// The key's query name, `s._domainkey.d.` (§3.6.2.1), when `d=` and `s=` make one.
fn key_name(sig: &Signature) -> Option<String> {
    let name = format!("{}._domainkey.{}", sig.s, sig.d);
    let ascii = if name.is_ascii() {
        name
    } else {
        idna::domain_to_ascii(&name).ok()?
    };
    let valid = ascii.len() <= 253
        && ascii.split('.').all(|l| {
            !l.is_empty()
                && l.len() <= 63
                && l.bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
        });
    valid.then(|| format!("{ascii}."))
}

// ---------------------------------------------------------------------------------------
// Key records (§3.6.1, RFC 8301, RFC 8463)
// ---------------------------------------------------------------------------------------

/// A usable key record, judged on its own (what depends on the signature is checked in
/// [`verify_with_key`]).
pub struct KeyRecord {
    key: DomainKey,
    /// The RSA key parsed once for rsa-sha256, the common case: mail-auth's key parses
    /// its bytes again on every verify (about 2 µs of a 15 µs verification here). `None` for Ed25519 keys and for bytes aws-lc will not parse this way
    /// (mail-auth's key is then used, as before).
    rsa_sha256: Option<ParsedPublicKey>,
    ed25519: bool,
    /// `h=`: which hashes the key may be used with (both when absent).
    sha1: bool,
    sha256: bool,
    /// `t=y`.
    testing: bool,
    /// `t=s`.
    strict: bool,
}

impl KeyRecord {
    /// §3.6.1: unknown tags and unknown values in lists are ignored.
    fn parse(raw: &[u8]) -> Result<KeyRecord, String> {
        let tags = tag_list(raw);
        if let Some(e) = tags.error {
            return Err(format!("key record: {e}"));
        }
        if let Some(pos) = tags.position("v")
            && (pos != 0 || tags.tags[pos].value != b"DKIM1")
        {
            return Err("key record: v= is not first or not DKIM1".into());
        }
        let p = tags.get("p").ok_or("key record has no p=")?;
        if p.value.iter().all(|&b| is_fws(b)) {
            return Err("key revoked (empty p=)".into());
        }
        let ed25519 = match tags.get("k").map(|t| t.value.to_ascii_lowercase()) {
            None => false,
            Some(k) if k == b"rsa" => false,
            Some(k) if k == b"ed25519" => true,
            Some(_) => return Err("key record: unknown key type (k=)".into()),
        };
        let (sha1, sha256) = match tags.get("h") {
            None => (true, true),
            Some(h) => (
                items(h.value).any(|i| i.eq_ignore_ascii_case(b"sha1")),
                items(h.value).any(|i| i.eq_ignore_ascii_case(b"sha256")),
            ),
        };
        if let Some(s) = tags.get("s")
            && !items(s.value).any(|i| i == b"*" || i.eq_ignore_ascii_case(b"email"))
        {
            return Err("key record is not for email (s=)".into());
        }
        let flag = |f: &[u8]| {
            tags.get("t")
                .is_some_and(|t| items(t.value).any(|i| i.eq_ignore_ascii_case(f)))
        };
        let key = DomainKey::parse(raw).map_err(|e| format!("unusable public key: {e}"))?;
        if !ed25519 {
            // mail-auth keeps RSA key bytes unchecked until a verify; 0 bits is what it
            // reports for bytes that are no RSA public key.
            let bits = key.p.public_key_bits();
            if bits == 0 {
                return Err("unusable public key: not an RSA public key".into());
            }
            if bits < MIN_RSA_BITS {
                return Err(format!(
                    "RSA key of {bits} bits, under {MIN_RSA_BITS} (RFC 8301)"
                ));
            }
        }
        let rsa_sha256 = (!ed25519).then(|| parsed_rsa_key(p.value)).flatten();
        Ok(KeyRecord {
            key,
            rsa_sha256,
            ed25519,
            sha1,
            sha256,
            testing: flag(b"y"),
            strict: flag(b"s"),
        })
    }
}

/// The `p=` value (base64 with folding whitespace) as an aws-lc RSA key for
/// rsa-sha256 (SubjectPublicKeyInfo or a bare RSAPublicKey, as mail-auth takes).
fn parsed_rsa_key(p: &[u8]) -> Option<ParsedPublicKey> {
    use base64::Engine as _;
    let text: Vec<u8> = p.iter().copied().filter(|&b| !is_fws(b)).collect();
    let der = base64::engine::general_purpose::STANDARD
        .decode(text)
        .ok()?;
    ParsedPublicKey::new(&RSA_PKCS1_1024_8192_SHA256_FOR_LEGACY_USE_ONLY, der).ok()
}

/// The first TXT record that is a usable key record, else why the first one is not
/// (§6.1.2: a verifier may choose among several records).
fn select_key(records: &[Vec<u8>]) -> Result<Arc<KeyRecord>, String> {
    let mut first_error = None;
    for raw in records {
        match KeyRecord::parse(raw) {
            Ok(key) => return Ok(Arc::new(key)),
            Err(e) => {
                first_error.get_or_insert(e);
            }
        }
    }
    Err(first_error.unwrap_or_else(|| "no key record (no TXT data)".into()))
}

#[derive(Clone)]
enum Fetched {
    Key(Arc<KeyRecord>),
    Perm(String),
    Temp(String),
}

/// The keys this message already asked for, so that no message looks up one name
/// twice (even with a TTL of 0 or no cache).
#[derive(Default)]
struct KeyMemo(Vec<(String, Fetched, Option<u64>)>);

impl KeyMemo {
    /// The key, and the age in seconds of the answer when it was a stale one.
    async fn fetch(&mut self, ctx: &Context<'_>, qname: &str) -> (Fetched, Option<u64>) {
        if let Some((_, f, age)) = self
            .0
            .iter()
            .find(|(n, _, _)| n.eq_ignore_ascii_case(qname))
        {
            return (f.clone(), *age);
        }
        let (fetched, age) = fetch_key(ctx, qname).await;
        self.0.push((qname.to_string(), fetched.clone(), age));
        (fetched, age)
    }
}

/// The key record at `qname`: from the cache, else one DNS query (counted); with the
/// age in seconds of the answer when no server answered and a stale one stood in.
async fn fetch_key(ctx: &Context<'_>, qname: &str) -> (Fetched, Option<u64>) {
    let key = qname.to_ascii_lowercase();
    if let Some(cached) = ctx.keys.get(key.as_str()) {
        return match cached {
            Ok(k) => (Fetched::Key(k), None),
            Err(e) => (Fetched::Perm(e), None),
        };
    }
    if Instant::now() >= ctx.deadline {
        return (Fetched::Temp("time budget exhausted".into()), None);
    }
    if !ctx.budget.take() {
        return (Fetched::Perm(LIMIT_REASON.into()), None);
    }
    let Ok(name) = Name::from_ascii(qname) else {
        return (Fetched::Perm("d= or s= is not a domain name".into()), None);
    };
    let lookup = tokio::time::timeout_at(ctx.deadline, ctx.dns.lookup(name, RecordType::TXT));
    match lookup.await {
        Err(_) => (Fetched::Temp("time budget exhausted".into()), None),
        Ok(Ok(answer)) if answer.records.is_empty() => (
            Fetched::Perm("no key record (NXDOMAIN or no TXT)".into()),
            answer.stale_age.map(|a| a.as_secs()),
        ),
        Ok(Ok(answer)) => {
            let records: Vec<Vec<u8>> = answer
                .records
                .iter()
                .filter_map(|r| match r {
                    // §3.6.2.2: the strings of one record are concatenated.
                    RData::TXT(txt) => Some(txt.txt_data.iter().flatten().copied().collect()),
                    _ => None,
                })
                .collect();
            let outcome = select_key(&records);
            // A stale answer has no `valid_until`: it never enters the fresh cache.
            if let Some(until) = answer.valid_until {
                ctx.keys
                    .insert(key.into_boxed_str(), outcome.clone(), until);
            }
            let fetched = match outcome {
                Ok(k) => Fetched::Key(k),
                Err(e) => Fetched::Perm(e),
            };
            (fetched, answer.stale_age.map(|a| a.as_secs()))
        }
        Ok(Err(e)) => {
            tracing::debug!(name = %qname, error = %e, "DKIM key lookup failed");
            (Fetched::Temp("DNS error fetching the key".into()), None)
        }
    }
}

// ---------------------------------------------------------------------------------------
// Verification with the key (§6.1.2, §6.1.3)
// ---------------------------------------------------------------------------------------

struct Outcome {
    result: AuthResult,
    reason: Option<String>,
}

fn verify_with_key(
    message: &AuthenticatedMessage<'_>,
    field: &Field<'_>,
    checked: &Checked<'_>,
    key: &KeyRecord,
    bodies: &mut BodyHashes<'_>,
) -> Result<Outcome, Verdict> {
    let sig = &checked.sig;
    if key.ed25519 != (sig.a == Algorithm::Ed25519Sha256) {
        return Err(Verdict::perm("key type (k=) does not match a="));
    }
    let hash = HashAlgorithm::from(sig.a);
    let allowed = match hash {
        HashAlgorithm::Sha1 => key.sha1,
        HashAlgorithm::Sha256 => key.sha256,
    };
    if !allowed {
        return Err(Verdict::perm("key record h= does not allow the hash of a="));
    }
    if key.strict
        && !sig.i.is_empty()
        && !sig
            .i
            .rsplit_once('@')
            .is_some_and(|(_, d)| d.eq_ignore_ascii_case(&sig.d))
    {
        return Err(Verdict::perm(
            "key is strict (t=s) and the i= domain is not d=",
        ));
    }
    let body = bodies.get(sig.cb, hash, checked.length);
    if let Some(l) = checked.length
        && l > body.canonical_len
    {
        return Err(Verdict::Perm(format!(
            "l= {l} is longer than the body ({} octets)",
            body.canonical_len
        )));
    }
    if body.hash != sig.bh {
        return Err(Verdict::Fail("body hash does not match".into()));
    }
    let unsigned = strip_b(field.value, &checked.b_span);
    let mut headers = message.signed_headers(&sig.h, field.name, &unsigned);
    match (&key.rsa_sha256, sig.a) {
        (Some(parsed), Algorithm::RsaSha256) => {
            let mut data = Vec::with_capacity(256);
            sig.ch.canonicalize_headers(&mut headers, &mut data);
            // The same words as mail-auth's error, so the reason does not depend on
            // which path verified.
            parsed.verify_sig(&data, &sig.b).map_err(|_| {
                Verdict::Fail("signature does not verify: Signature verification failed".into())
            })?;
        }
        _ => key
            .key
            .p
            .verify(&mut headers, &sig.b, sig.ch, sig.a)
            .map_err(|e| Verdict::Fail(format!("signature does not verify: {e}")))?,
    }
    let appended = checked.length.map_or(0, |l| body.canonical_len - l);
    let mut notes = Vec::new();
    if appended > 0 {
        notes.push(format!(
            "body length limit: {appended} unsigned octets appended"
        ));
    }
    if key.testing {
        notes.push("key in testing mode (t=y)".into());
    }
    Ok(Outcome {
        result: if appended > 0 {
            AuthResult::Policy
        } else {
            AuthResult::Pass
        },
        reason: (!notes.is_empty()).then(|| notes.join("; ")),
    })
}

/// The field value with the `b=` value deleted and no final CRLF: what the header hash
/// covers for the signature field itself (§3.5 `b=`, §3.7).
fn strip_b(value: &[u8], b_span: &Range<usize>) -> Vec<u8> {
    let mut out = Vec::with_capacity(value.len());
    out.extend_from_slice(&value[..b_span.start]);
    out.extend_from_slice(&value[b_span.end..]);
    if out.ends_with(b"\r\n") {
        out.truncate(out.len() - 2);
    } else if out.ends_with(b"\n") {
        out.truncate(out.len() - 1);
    }
    out
}

/// A body hash and the length of the whole canonical body.
#[derive(Clone)]
struct BodyHash {
    hash: Vec<u8>,
    canonical_len: u64,
}

/// Body hashes of one message by (canonicalization, hash, `l=`), each computed once.
/// The full-body hashes mail-auth computed while parsing are taken as they are (it
/// computes them for every signature it accepted without `l=`).
struct BodyHashes<'m> {
    message: &'m AuthenticatedMessage<'m>,
    done: Vec<(Canonicalization, HashAlgorithm, Option<u64>, BodyHash)>,
}

impl<'m> BodyHashes<'m> {
    fn new(message: &'m AuthenticatedMessage<'m>) -> Self {
        BodyHashes {
            message,
            done: Vec::new(),
        }
    }

    fn get(&mut self, cb: Canonicalization, ha: HashAlgorithm, l: Option<u64>) -> BodyHash {
        if let Some((.., h)) = self
            .done
            .iter()
            .find(|(c, h, len, _)| *c == cb && *h == ha && *len == l)
        {
            return h.clone();
        }
        let body = self
            .message
            .raw_message
            .get(self.message.body_offset as usize..)
            .unwrap_or_default();
        let precomputed = (l.is_none())
            .then(|| {
                self.message
                    .body_hashes
                    .iter()
                    .find(|(c, h, len, _)| *c == cb && *h == ha && *len == 0)
            })
            .flatten();
        let computed = match precomputed {
            // Without l= only the hash is compared: the length is not needed.
            Some((.., hash)) => BodyHash {
                hash: hash.clone(),
                canonical_len: 0,
            },
            None => body_hash(body, cb, ha, l),
        };
        self.done.push((cb, ha, l, computed.clone()));
        computed
    }
}

/// The hash of the first `l` octets of the canonical body (all of it without `l`), and
/// the canonical body's whole length (§3.4.3, §3.4.4, §3.5 `l=`).
fn body_hash(body: &[u8], cb: Canonicalization, ha: HashAlgorithm, l: Option<u64>) -> BodyHash {
    let total = Cell::new(0);
    let hash = ha.hash(Prefix {
        body,
        cb,
        limit: l.unwrap_or(u64::MAX),
        total: &total,
    });
    BodyHash {
        hash: hash.as_ref().to_vec(),
        canonical_len: total.get(),
    }
}

/// The canonical body, cut after `limit` octets, as a mail-auth `Writable`; the whole
/// canonical length is left in `total`.
struct Prefix<'a> {
    body: &'a [u8],
    cb: Canonicalization,
    limit: u64,
    total: &'a Cell<u64>,
}

impl Writable for Prefix<'_> {
    fn write(self, writer: &mut impl Writer) {
        let mut cut = Cut {
            inner: writer,
            left: self.limit,
            total: 0,
        };
        self.cb.canonical_body(self.body, 0).write(&mut cut);
        self.total.set(cut.total);
    }
}

struct Cut<'w, W> {
    inner: &'w mut W,
    left: u64,
    total: u64,
}

impl<W: Writer> Writer for Cut<'_, W> {
    fn write(&mut self, buf: &[u8]) {
        self.total += buf.len() as u64;
        let n = usize::try_from(self.left).map_or(buf.len(), |left| left.min(buf.len()));
        if n > 0 {
            self.inner.write(&buf[..n]);
            self.left -= n as u64;
        }
    }
}

fn unix_now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

#[cfg(test)]
mod tests {
    use super::*;

    use std::time::Duration;

    use base64::Engine as _;
    use mail_auth::common::crypto::Ed25519Key;
    use mail_auth::common::headers::HeaderWriter;
    use mail_auth::dkim::DkimSigner;

    use crate::auth::budget::DnsBudget;

    /// A 1024-bit and a 512-bit RSA public key (SubjectPublicKeyInfo, base64).
    const RSA1024: &str = "MIGfMA0GCSqGSIb3DQEBAQUAA4GNADCBiQKBgQCxipkGPHlVwn73v0q+IOQq7nyvU/sMozGGcLFSfqlCeBYUSdT9bBiReqb+wv9LgBJqLYZzPb1uGT1C3mrAF41yXoI4slm8Vc/N+cV79th52FWC2kdEMfa/ZdMKBS9FsJA/qtKzphc4N10xALXacz8jtREcSgJsjMmxxm2Z2O1BxQIDAQAB";
    const RSA512: &str = "MFwwDQYJKoZIhvcNAQEBBQADSwAwSAJBAMkQ/DtobVtsjdFFojadEF5xuX0vc9bZOxLQuwQDD9hBK5v4Tc4q5Fdi++yFpVz5tWUU6HxP+pjk3/fQbk5OnCsCAwEAAQ==";
    const NOW: u64 = 1_800_000_000;

    fn sig_tags(extra: &str) -> String {
        format!("v=1; a=ed25519-sha256; d=example.com; s=ed; h=from:to; bh=AAAA; b=BBBB{extra}")
    }

    fn precheck_of(value: &str) -> Result<Checked<'static>, Verdict> {
        precheck(&tag_list(value.as_bytes()), value.as_bytes(), None, NOW)
    }

    fn perm(reason: &str) -> Result<(), Verdict> {
        Err(Verdict::perm(reason))
    }

    #[test]
    fn query_method_must_be_dns_txt() {
        let base = "v=1; a=rsa-sha256; d=example.com; s=s; h=from; bh=YQ==; b=YQ==";
        for ok in ["", "; q=dns/txt", "; q=DNS/TXT", "; q=other/x:dns/txt"] {
            assert!(precheck_of(&format!("{base}{ok}")).is_ok(), "{ok}");
        }
        for bad in ["; q=dns/foo", "; q=", "; q=http/well-known"] {
            assert!(
                matches!(precheck_of(&format!("{base}{bad}")), Err(Verdict::Perm(_))),
                "{bad}"
            );
        }
    }

    #[test]
    fn tag_lists() {
        let t = tag_list(b" v=1;\r\n\ta = rsa-sha256 ;b= ab\r\n cd ; ");
        assert!(t.error.is_none(), "{:?}", t.error);
        assert_eq!(t.get("a").unwrap().value, b"rsa-sha256");
        assert_eq!(t.get("b").unwrap().value, b"ab\r\n cd");
        assert_eq!(t.position("v"), Some(0));
        let text = b"v=1; b= xy ; d=x";
        let span = tag_list(text).get("b").unwrap().span.clone();
        assert_eq!(&text[span], b" xy ");
        for (bad, why) in [
            (&b"d=a; d=b"[..], "duplicate tag d="),
            (b"d=a;; s=b", "empty tag"),
            (b"d=a; s", "tag without '='"),
            (b"1d=a", "invalid tag name"),
            (b"d=a; x-y=b", "invalid tag name"),
        ] {
            let t = tag_list(bad);
            assert_eq!(
                t.error.as_deref(),
                Some(why),
                "{}",
                String::from_utf8_lossy(bad)
            );
            // The well-formed tags are still there, to keep d= in the result.
            assert!(t.get("d").is_some() || bad.starts_with(b"1"));
        }
        // Tag names are case-sensitive (§3.2): D= is not d=.
        assert!(tag_list(b"D=a").get("d").is_none());
    }

    #[test]
    fn numbers() {
        assert_eq!(number(b"0", 12), Some(0));
        assert_eq!(number(b"123", 12), Some(123));
        assert_eq!(number(b"", 12), None);
        assert_eq!(number(b"12a", 12), None);
        assert_eq!(number(b"-1", 12), None);
        assert_eq!(number(b"1234567890123", 12), None);
        assert_eq!(number(&[b'9'; 40], 76), Some(u64::MAX));
    }

    #[test]
    fn auid_must_be_within_the_signing_domain() {
        for (auid, ok) in [
            ("@example.com", true),
            ("user@example.com", true),
            ("user@EXAMPLE.com", true),
            ("user@sub.example.com", true),
            ("user@example.com.evil", false),
            ("user@xexample.com", false),
            ("user@other.org", false),
            ("example.com", false),
            ("@", false),
        ] {
            assert_eq!(within_domain(auid, "example.com"), ok, "{auid}");
        }
    }

    #[test]
    fn signature_tags_alone() {
        assert!(precheck_of(&sig_tags("")).is_ok());
        // Unknown tags are ignored (§3.2), z= and q= included.
        assert!(precheck_of(&sig_tags("; foo=bar; q=dns/txt; z=From:a@b")).is_ok());
        let check = |extra: &str| precheck_of(&sig_tags(extra)).map(|_| ());
        assert_eq!(
            precheck_of(
                "v=1; a=ed25519-sha256; d=example.com; s=ed; h=to:subject; bh=AAAA; b=BBBB"
            )
            .map(|_| ()),
            perm("From not signed")
        );
        // "From" in another case, with spaces, counts.
        assert!(
            precheck_of("v=1; a=ed25519-sha256; d=example.com; s=ed; h=to : FROM; bh=AAAA; b=BBBB")
                .is_ok()
        );
        // Another field whose name contains "from" does not.
        assert_eq!(
            precheck_of(
                "v=1; a=ed25519-sha256; d=example.com; s=ed; h=x-from:resent-from; bh=AAAA; b=BBBB"
            )
            .map(|_| ()),
            perm("From not signed")
        );
        assert_eq!(check("; i=a@example.net"), perm("i= is not within d="));
        assert!(check("; i=a@mail.example.com").is_ok());
        assert_eq!(check("; t=100; x=100"), perm("x= is not after t="));
        assert_eq!(check("; t=100; x=90"), perm("x= is not after t="));
        assert_eq!(
            check(&format!("; x={}", NOW - 1)),
            perm("signature expired (x=)")
        );
        assert!(check(&format!("; t={}; x={}", NOW - 10, NOW + 10)).is_ok());
        assert_eq!(
            check(&format!("; t={}", NOW + CLOCK_SKEW + 1)),
            perm("t= is in the future")
        );
        assert!(check(&format!("; t={}", NOW + CLOCK_SKEW)).is_ok());
        assert_eq!(check("; t=soon"), perm("t= is not a number"));
        assert_eq!(check("; l=12x"), perm("l= is not a number"));
        assert_eq!(precheck_of(&sig_tags("; l=0")).unwrap().length, Some(0));
        assert_eq!(precheck_of(&sig_tags("")).unwrap().length, None);
        assert_eq!(
            check("; d=other.example"),
            perm("malformed signature: duplicate tag d=")
        );
        assert_eq!(
            precheck_of(&sig_tags("").replace("v=1", "v=2")).map(|_| ()),
            perm("unsupported version (v= is not 1)")
        );
        assert_eq!(
            precheck_of(&sig_tags("").replace("v=1; ", "")).map(|_| ()),
            perm("malformed signature: no v=")
        );
        assert_eq!(
            precheck_of(&sig_tags("").replace("a=ed25519-sha256; ", "")).map(|_| ()),
            perm("malformed signature: no a=")
        );
        assert_eq!(
            precheck_of(&sig_tags("").replace("ed25519-sha256", "rsa-sha1")).map(|_| ()),
            Err(Verdict::Fail("rsa-sha1 is not accepted (RFC 8301)".into()))
        );
    }

    #[test]
    fn identity_survives_a_malformed_signature() {
        let tags = tag_list(b"v=1; d=Example.COM; s=sel; a=rsa-sha256; b=; b=x");
        let c = identity(&tags);
        assert_eq!(
            (c.domain.as_str(), c.selector.as_str()),
            ("example.com", "sel")
        );
        assert_eq!(c.algorithm, "rsa-sha256");
        assert_eq!(identity(&tag_list(b"d=x.example; a=rsa-md5")).algorithm, "");
    }

    fn key(text: &str) -> Result<KeyRecord, String> {
        KeyRecord::parse(text.as_bytes())
    }

    /// RSA keys are parsed once, from either encoding mail-auth takes and with folding
    /// whitespace in `p=`; what aws-lc will not parse falls back to mail-auth's key.
    #[test]
    fn rsa_keys_are_parsed_once_in_both_encodings() {
        let spki = base64::engine::general_purpose::STANDARD
            .decode(RSA1024)
            .unwrap();
        // A 1024-bit SubjectPublicKeyInfo: SEQUENCE (3), AlgorithmIdentifier (15),
        // BIT STRING header (4), then the bare RSAPublicKey.
        let bare = base64::engine::general_purpose::STANDARD.encode(&spki[22..]);
        let folded = format!("{} \r\n\t{}", &RSA1024[..40], &RSA1024[40..]);
        for p in [RSA1024, &bare, &folded] {
            let k = key(&format!("v=DKIM1; k=rsa; p={p}")).unwrap();
            assert!(k.rsa_sha256.is_some(), "{p}");
        }
        assert!(parsed_rsa_key(b"not base64!").is_none());
        assert!(parsed_rsa_key(b"AAAA").is_none());
    }

    #[test]
    fn key_records() {
        let ok = key(&format!("v=DKIM1; k=rsa; p={RSA1024}")).unwrap();
        assert!(!ok.ed25519 && ok.sha1 && ok.sha256 && !ok.testing && !ok.strict);
        // No v=, no k=: RSA; unknown tags ignored.
        assert!(key(&format!("p={RSA1024}; foo=bar; n=notes")).is_ok());
        let flags = key(&format!(
            "v=DKIM1; h=sha1; t=y:s:x; s=email:other; p={RSA1024}"
        ))
        .unwrap();
        assert!(flags.sha1 && !flags.sha256 && flags.testing && flags.strict);
        let h = key(&format!("h=sha256:future-hash; p={RSA1024}")).unwrap();
        assert!(!h.sha1 && h.sha256);
        assert!(key(&format!("s=*; p={RSA1024}")).is_ok());
        for (text, why) in [
            (
                format!("k=rsa; v=DKIM1; p={RSA1024}"),
                "key record: v= is not first or not DKIM1",
            ),
            (
                format!("v=DKIM2; p={RSA1024}"),
                "key record: v= is not first or not DKIM1",
            ),
            ("v=DKIM1; p=".into(), "key revoked (empty p=)"),
            ("v=DKIM1; p= ; k=rsa".into(), "key revoked (empty p=)"),
            ("v=DKIM1; k=rsa".into(), "key record has no p="),
            (
                format!("v=DKIM1; k=dsa; p={RSA1024}"),
                "key record: unknown key type (k=)",
            ),
            (
                format!("v=DKIM1; s=tlsrpt; p={RSA1024}"),
                "key record is not for email (s=)",
            ),
            (
                format!("v=DKIM1; p={RSA1024}; p={RSA1024}"),
                "key record: duplicate tag p=",
            ),
            (
                format!("v=DKIM1; p={RSA512}"),
                "RSA key of 512 bits, under 1024 (RFC 8301)",
            ),
        ] {
            assert_eq!(key(&text).err().as_deref(), Some(why), "{text}");
        }
        assert!(
            key("v=DKIM1; p=bm90IGEga2V5")
                .err()
                .is_some_and(|e| e.starts_with("unusable public key"))
        );
        // The first usable record among several TXT records.
        let records = vec![b"v=spf1 -all".to_vec(), format!("p={RSA1024}").into_bytes()];
        assert!(select_key(&records).is_ok());
        assert_eq!(
            select_key(&[]).err().as_deref(),
            Some("no key record (no TXT data)")
        );
    }

    #[test]
    fn b_value_is_deleted_for_the_header_hash() {
        let v = b" v=1; b=abc\r\n def; bh=x\r\n";
        let span = tag_list(v).get("b").unwrap().span.clone();
        assert_eq!(strip_b(v, &span), b" v=1; b=; bh=x");
        let v = b" v=1; bh=x; b = abc\r\n";
        let span = tag_list(v).get("b").unwrap().span.clone();
        assert_eq!(strip_b(v, &span), b" v=1; bh=x; b =");
    }

    #[test]
    fn body_length_counts_canonical_octets() {
        // Relaxed: "a  b \r\n\r\n\r\n" is "a b\r\n" (5 octets) after canonicalization.
        let body = b"a  b \r\n\r\n\r\n";
        let full = body_hash(body, Canonicalization::Relaxed, HashAlgorithm::Sha256, None);
        assert_eq!(full.canonical_len, 5);
        assert_eq!(
            full.hash,
            HashAlgorithm::Sha256.hash(&b"a b\r\n"[..]).as_ref()
        );
        let three = body_hash(
            body,
            Canonicalization::Relaxed,
            HashAlgorithm::Sha256,
            Some(3),
        );
        assert_eq!(three.hash, HashAlgorithm::Sha256.hash(&b"a b"[..]).as_ref());
        assert_eq!(three.canonical_len, 5);
        // l=0 signs nothing: the hash of the empty string.
        let none = body_hash(
            body,
            Canonicalization::Simple,
            HashAlgorithm::Sha256,
            Some(0),
        );
        assert_eq!(none.hash, HashAlgorithm::Sha256.hash(&b""[..]).as_ref());
        // Simple: an empty body is one CRLF.
        let empty = body_hash(b"", Canonicalization::Simple, HashAlgorithm::Sha256, None);
        assert_eq!(empty.canonical_len, 2);
    }

    // -- Whole signatures, signed here with mail-auth's Ed25519 signer; keys come from a
    // -- pre-filled key cache, so no DNS is involved unless a test wants it.

    const MESSAGE: &str =
        "From: alice@example.com\r\nTo: bob@example.org\r\nSubject: hi\r\n\r\nHello Bob.\r\n";

    struct Signer {
        pkcs8: Vec<u8>,
        public: String,
    }

    impl Signer {
        fn new() -> Signer {
            let pkcs8 = Ed25519Key::generate_pkcs8().unwrap();
            let k = Ed25519Key::from_pkcs8_der(&pkcs8).unwrap();
            let public = base64::engine::general_purpose::STANDARD.encode(k.public_key());
            Signer { pkcs8, public }
        }

        /// The message with a DKIM-Signature over `headers` added on top.
        fn sign(&self, message: &str, headers: &[&str], body_length: bool) -> String {
            let key = Ed25519Key::from_pkcs8_der(&self.pkcs8).unwrap();
            let sig = DkimSigner::from_key(key)
                .domain("example.com")
                .selector("ed")
                .headers(headers.iter().copied())
                .body_length(body_length)
                .sign(message.as_bytes())
                .unwrap();
            format!("{}{message}", sig.to_header())
        }

        fn record(&self, extra: &str) -> String {
            format!("v=DKIM1; k=ed25519;{extra} p={}", self.public)
        }
    }

    fn resolver() -> DnsClient {
        // A closed port on loopback: any lookup fails at once.
        let cfg = crate::config::DnsConfig {
            nameservers: vec!["127.0.0.1:9".parse().unwrap()],
            timeout_ms: 200,
            attempts: 1,
            cache_entries: 0,
            ..crate::config::DnsConfig::default()
        };
        DnsClient::new(&cfg).unwrap()
    }

    /// Verifies `message` with `record` (if any) published as the `ed` key.
    async fn run(message: &str, record: Option<&str>, lookups: u32) -> Vec<DkimCheck> {
        let keys = KeyCache::new(10);
        if let Some(r) = record {
            keys.insert(
                "ed._domainkey.example.com.".into(),
                KeyRecord::parse(r.as_bytes()).map(Arc::new),
                std::time::Instant::now() + Duration::from_secs(60),
            );
        }
        let resolver = resolver();
        let budget = DnsBudget::new(lookups);
        let ctx = Context {
            dns: &resolver,
            keys: &keys,
            budget: &budget,
            deadline: Instant::now() + Duration::from_secs(5),
            max_signatures: 5,
        };
        let parsed = AuthenticatedMessage::parse(message.as_bytes()).unwrap();
        verify(&ctx, &parsed).await
    }

    fn words(checks: &[DkimCheck]) -> Vec<(AuthResult, Option<&str>)> {
        checks
            .iter()
            .map(|c| (c.result, c.reason.as_deref()))
            .collect()
    }

    #[tokio::test]
    async fn signed_messages() {
        let s = Signer::new();
        let all = ["From", "To", "Subject"];
        let signed = s.sign(MESSAGE, &all, false);
        let record = s.record("");
        let pass = run(&signed, Some(&record), 0).await;
        assert_eq!(words(&pass), [(AuthResult::Pass, None)]);
        assert_eq!(
            (
                pass[0].domain.as_str(),
                pass[0].selector.as_str(),
                pass[0].algorithm.as_str()
            ),
            ("example.com", "ed", "ed25519-sha256")
        );

        // §5.4 / §6.1.1: a valid signature that covers no From never passes.
        let no_from = s.sign(MESSAGE, &["To", "Subject"], false);
        let r = run(&no_from, Some(&record), 0).await;
        assert_eq!(
            words(&r),
            [(AuthResult::PermError, Some("From not signed"))]
        );
        assert_eq!(r[0].domain, "example.com", "d= is kept on permerror");

        // Key record rules.
        for (extra, want) in [
            (" h=sha1;", "key record h= does not allow the hash of a="),
            (" s=other;", "key record is not for email (s=)"),
        ] {
            let r = run(&signed, Some(&s.record(extra)), 0).await;
            assert_eq!(words(&r), [(AuthResult::PermError, Some(want))], "{extra}");
        }
        let rsa_typed = format!("v=DKIM1; k=rsa; p={RSA1024}");
        assert_eq!(
            words(&run(&signed, Some(&rsa_typed), 0).await),
            [(
                AuthResult::PermError,
                Some("key type (k=) does not match a=")
            )]
        );
        assert_eq!(
            words(&run(&signed, Some("v=DKIM1; k=ed25519; p="), 0).await),
            [(AuthResult::PermError, Some("key revoked (empty p=)"))]
        );
        assert_eq!(
            words(&run(&signed, Some(&s.record(" t=y;")), 0).await),
            [(AuthResult::Pass, Some("key in testing mode (t=y)"))]
        );
        assert_eq!(
            words(&run(&signed, Some(&s.record(" h=sha256; s=email; t=s;")), 0).await),
            [(AuthResult::Pass, None)]
        );
        // Another key than the signer's: the signature does not verify.
        let other = Signer::new().record("");
        let r = run(&signed, Some(&other), 0).await;
        assert_eq!(r[0].result, AuthResult::Fail);

        // Tampering: body and signed header.
        let body = signed.replace("Hello Bob.", "Hello Eve.");
        assert_eq!(
            words(&run(&body, Some(&record), 0).await),
            [(AuthResult::Fail, Some("body hash does not match"))]
        );
        let subject = signed.replace("Subject: hi", "Subject: pay now");
        assert_eq!(
            run(&subject, Some(&record), 0).await[0].result,
            AuthResult::Fail
        );
    }

    #[tokio::test]
    async fn body_length_limit() {
        let s = Signer::new();
        let record = s.record("");
        let signed = s.sign(MESSAGE, &["From", "To"], true);
        assert!(signed.contains("l=12"), "{signed}");
        // Nothing after the signed length: an ordinary pass.
        assert_eq!(
            words(&run(&signed, Some(&record), 0).await),
            [(AuthResult::Pass, None)]
        );
        // Content appended: verifies, but only as `policy`.
        let appended = format!("{signed}Click here: http://evil.example/\r\n");
        assert_eq!(
            words(&run(&appended, Some(&record), 0).await),
            [(
                AuthResult::Policy,
                Some("body length limit: 34 unsigned octets appended")
            )]
        );
        // A signed part that was changed still fails.
        let changed = appended.replace("Hello Bob.", "Hello Eve.");
        assert_eq!(
            run(&changed, Some(&record), 0).await[0].result,
            AuthResult::Fail
        );
        // l= longer than the body.
        let cut = signed.replace("Hello Bob.\r\n", "Hello\r\n");
        assert_eq!(
            words(&run(&cut, Some(&record), 0).await),
            [(
                AuthResult::PermError,
                Some("l= 12 is longer than the body (7 octets)")
            )]
        );
    }

    #[tokio::test]
    async fn lookups_counted_and_capped() {
        let s = Signer::new();
        let signed = s.sign(MESSAGE, &["From"], false);
        // Not cached, no lookup left: permerror, and no query was made.
        assert_eq!(
            words(&run(&signed, None, 0).await),
            [(AuthResult::PermError, Some(LIMIT_REASON))]
        );
        // One lookup allowed, against a DNS server that is not there: temperror.
        let r = run(&signed, None, 1).await;
        assert_eq!(r[0].result, AuthResult::TempError, "{r:?}");
        // Two signatures with one selector: one lookup (the second from the memo).
        let twice = s.sign(&signed, &["From"], false);
        let keys = KeyCache::new(0);
        let resolver = resolver();
        let budget = DnsBudget::new(5);
        let ctx = Context {
            dns: &resolver,
            keys: &keys,
            budget: &budget,
            deadline: Instant::now() + Duration::from_secs(5),
            max_signatures: 5,
        };
        let parsed = AuthenticatedMessage::parse(twice.as_bytes()).unwrap();
        let r = verify(&ctx, &parsed).await;
        assert_eq!(r.len(), 2);
        assert_eq!(budget.used(), 1);
        // The signature cap: only the first is looked at.
        let one = Context {
            max_signatures: 1,
            ..ctx
        };
        assert_eq!(verify(&one, &parsed).await.len(), 1);
    }

    /// A key is looked up once, then served from the key cache for its TTL (the lookup
    /// count of later messages stays 0, nothing reaches the server).
    #[tokio::test]
    async fn keys_are_cached_between_messages() {
        use crate::auth::spf::test_dns::{DnsServer, Zone};
        let s = Signer::new();
        let dns = DnsServer::start(Zone::new().txt("ed._domainkey.example.com", &s.record("")));
        let cfg = crate::config::DnsConfig {
            nameservers: vec![dns.addr()],
            timeout_ms: 2000,
            attempts: 1,
            cache_entries: 0,
            ..crate::config::DnsConfig::default()
        };
        let resolver = DnsClient::new(&cfg).unwrap();
        let keys = KeyCache::new(10);
        let signed = s.sign(MESSAGE, &["From"], false);
        let parsed = AuthenticatedMessage::parse(signed.as_bytes()).unwrap();
        for round in 0..3 {
            let budget = DnsBudget::new(10);
            let ctx = Context {
                dns: &resolver,
                keys: &keys,
                budget: &budget,
                deadline: Instant::now() + Duration::from_secs(5),
                max_signatures: 5,
            };
            assert_eq!(
                words(&verify(&ctx, &parsed).await),
                [(AuthResult::Pass, None)]
            );
            assert_eq!(budget.used(), u32::from(round == 0), "round {round}");
        }
        assert_eq!(dns.queries_for("ed._domainkey.example.com"), 1);
    }

    #[tokio::test]
    async fn malformed_signatures_keep_their_domain() {
        let msg = format!(
            "DKIM-Signature: v=1; a=rsa-sha256; d=Bank.Example; s=s1; h=from; bh=; b=\r\n{MESSAGE}"
        );
        let r = run(&msg, None, 0).await;
        assert_eq!(
            words(&r),
            [(AuthResult::PermError, Some("malformed signature: no b="))]
        );
        assert_eq!(
            (r[0].domain.as_str(), r[0].selector.as_str()),
            ("bank.example", "s1")
        );
    }
}
