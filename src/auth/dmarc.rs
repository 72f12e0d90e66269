//! DMARC evaluation of our own (RFC 7489, with the DMARCbis tree walk of RFC 9989).
//!
//! mail-auth's `verify_dmarc` takes the first parseable record at a name (two records are
//! used as if one was), turns a record with an invalid `p=` into permerror, ignores `pct=`,
//! and makes any DKIM temperror a DMARC temperror. This module replaces it:
//!
//! * **Discovery** (RFC 7489 §6.6.3, RFC 9989 §4.10.1): the TXT records at
//!   `_dmarc.<name>` that start with `v=DMARC1`; others are ignored. Two or more such
//!   records are no usable record at that name, and the tree walk goes on to the next
//!   shorter name, as it does when there is none. A record whose `p=` (or `sp=`) is
//!   missing or invalid is read as `p=none` when it has a syntactically valid `rua=`;
//!   without one, DMARC does not apply (result `none`). Other tags with invalid values
//!   take their defaults (RFC 7489 §6.3).
//! * **Organizational domains** come from the tree walk (RFC 9989 §4.10.2), never from a
//!   public suffix list: the sender's own records say where the boundary is, and there is
//!   no list to ship and keep current. They are only looked up for relaxed alignment of an
//!   identifier that is not the From domain itself but lies under the From domain's
//!   organizational domain: an attacker's own domain never causes a walk.
//! * **Policy**: `p=` at the From domain itself, `sp=` for a subdomain, `np=` (RFC 9989)
//!   for a non-existent subdomain (no A, AAAA or MX: NXDOMAIN or NODATA for all three,
//!   RFC 9091 §2.7); when existence cannot be told (DNS error) the stricter of `sp`/`np`.
//!   `pct=` (RFC 7489 §6.6.4): a failing message not in the sample gets the next lower
//!   policy; the sample is drawn at random per message (`rand`, thread-local CSPRNG), so
//!   `pct=0` never applies the published policy and `pct=100` always does. `t=y`
//!   (RFC 9989 testing mode) also applies the next lower policy (once, even with `pct`).
//!   The published policy and the applied one are both kept ([`DmarcCheck`]); rules see
//!   the applied one, as does `policy.dmarc` in our Authentication-Results (RFC 7489
//!   §11.2 defines it as the policy "after policy options including pct: and sp: have been
//!   processed"); the published one is in the result comment.
//! * **Temperror** only from what could change the outcome: the DMARC record lookup
//!   itself, or an SPF/DKIM temperror of an identifier that aligns with the From domain.
//!   A signature of an unrelated domain whose key lookup timed out cannot make a DMARC
//!   fail a temperror (it could never have made DMARC pass).
//! * **ARC override** (RFC 8617 §7.2): a DMARC fail whose most recent ARC set was sealed
//!   by a trusted sealer that recorded a pass for this From domain stays `fail`, with the
//!   applied policy `none` and the sealer named ([`super::arc`] decides what the set
//!   recorded; alignment of its DKIM/SPF claims is judged here, like our own).
//!
//! Two steps, so that the time budget cannot be spent on unrelated signatures before
//! DMARC has its record: [`discover`] (the record, the applicable published policy, the
//! From domain's organizational domain) needs nothing from the other checks and runs
//! beside DKIM and ARC; [`decide`] then needs DNS only for the organizational domain of an
//! identifier under the From domain's own, and keeps to the deadline itself.
//!
//! Lookups go through the proxy's resolver and a [`DmarcCache`] (a [`TtlCache`] bounded
//! by `[dns] cache_entries`, like mail-auth's TXT cache): what is at a `_dmarc` name,
//! parsed, until its TTL (a negative answer for its SOA negative TTL, at most
//! [`super::spf::NEGATIVE_TTL_MAX`]); DNS errors are never cached. mail-auth's `Txt` type
//! cannot hold "two records" or `pct`, hence a cache of our own type.

use std::collections::HashMap;
use std::sync::Arc;

use hickory_resolver::proto::rr::{Name, RData, RecordType};

use super::arc::ArcLatest;
use super::cache::TtlCache;
use super::dns::DnsClient;
use super::stale::StaleMark;
use super::{AuthResult, DkimCheck, DmarcCheck, SpfCheck};

/// Most names one tree walk queries (RFC 9989 §4.10: the name itself, then at most 7
/// labels down to the top-level domain).
const MAX_WALK: usize = 8;

/// A requested policy (`p`, `sp`, `np`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Policy {
    None,
    Quarantine,
    Reject,
}

impl Policy {
    pub fn as_str(self) -> &'static str {
        match self {
            Policy::None => "none",
            Policy::Quarantine => "quarantine",
            Policy::Reject => "reject",
        }
    }

    /// The next lower policy (RFC 7489 §6.6.4).
    fn lower(self) -> Policy {
        match self {
            Policy::Reject => Policy::Quarantine,
            Policy::Quarantine | Policy::None => Policy::None,
        }
    }

    fn parse(v: &str) -> Option<Policy> {
        match v.to_ascii_lowercase().as_str() {
            "none" => Some(Policy::None),
            "quarantine" => Some(Policy::Quarantine),
            "reject" => Some(Policy::Reject),
            _ => None,
        }
    }
}

/// Identifier alignment mode (`adkim`, `aspf`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    Relaxed,
    Strict,
}

/// The `psd` tag (RFC 9989).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Psd {
    Yes,
    No,
    Unknown,
}

/// One DMARC record, read as the RFCs say (defaults for invalid values).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Record {
    /// `None`: no valid `p=` (or an invalid `sp=`) and no valid `rua=`: DMARC does not
    /// apply. A missing or invalid `p=` with a valid `rua=` is `Some(Policy::None)`.
    pub p: Option<Policy>,
    pub sp: Option<Policy>,
    pub np: Option<Policy>,
    pub adkim: Mode,
    pub aspf: Mode,
    /// 0..=100; 100 when absent or invalid.
    pub pct: u8,
    /// `t=y`: testing mode.
    pub testing: bool,
    pub psd: Psd,
    /// The `p=` (or `sp=`) was missing or invalid and `rua=` made it `p=none`.
    pub p_defaulted: bool,
    /// `rua=` as published (aggregate report destinations, `!size` suffixes kept);
    /// empty when absent or invalid. Used by [`crate::dmarc_reports`].
    pub rua: String,
    /// `fo=` as published, `0` when absent (reported back in `policy_published`).
    pub fo: String,
}

/// What is published at one `_dmarc` name.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum AtName {
    None,
    /// Two or more `v=DMARC1` records: none usable (RFC 7489 §6.6.3).
    Several,
    Record(Arc<Record>),
}

/// Parsed `_dmarc` lookups, keyed by the query name.
pub type DmarcCache = TtlCache<Box<str>, AtName>;

/// Whether a TXT record is a DMARC record: `v` `=` `DMARC1` first (RFC 7489 §6.4:
/// `dmarc-version`, whitespace allowed around `=`), then the end or a `;`.
fn is_dmarc1(text: &str) -> bool {
    let Some(rest) = text.strip_prefix(['v', 'V']) else {
        return false;
    };
    let Some(rest) = rest.trim_start_matches([' ', '\t']).strip_prefix('=') else {
        return false;
    };
    let Some(rest) = rest.trim_start_matches([' ', '\t']).strip_prefix("DMARC1") else {
        return false;
    };
    let rest = rest.trim_start_matches([' ', '\t']);
    rest.is_empty() || rest.starts_with(';')
}

/// A syntactically valid `rua=` (RFC 7489 §6.4 `dmarc-urilist`): at least one URI with
/// a scheme and something after it, optionally followed by `!size`.
fn valid_urilist(v: &str) -> bool {
    v.split(',').any(|uri| {
        let uri = uri.trim();
        let uri = uri.split_once('!').map_or(uri, |(u, _)| u);
        uri.split_once(':').is_some_and(|(scheme, rest)| {
            scheme.starts_with(|c: char| c.is_ascii_alphabetic())
                && scheme
                    .chars()
                    .all(|c| c.is_ascii_alphanumeric() || matches!(c, '+' | '-' | '.'))
                && !rest.is_empty()
                && !rest.contains(char::is_whitespace)
        })
    })
}

/// Parses one TXT record; `None` if it is not a DMARC record at all.
pub fn parse_record(text: &str) -> Option<Record> {
    if !is_dmarc1(text) {
        return None;
    }
    let mut tags: HashMap<String, &str> = HashMap::new();
    for part in text.split(';').skip(1) {
        if let Some((k, v)) = part.split_once('=') {
            // The first occurrence of a tag counts.
            tags.entry(k.trim().to_ascii_lowercase())
                .or_insert(v.trim());
        }
    }
    let policy = |k: &str| tags.get(k).and_then(|v| Policy::parse(v));
    let invalid = |k: &str| tags.contains_key(k) && policy(k).is_none();
    let mode = |k: &str| match tags.get(k).map(|v| v.to_ascii_lowercase()).as_deref() {
        Some("s") => Mode::Strict,
        _ => Mode::Relaxed,
    };
    let has_rua = tags.get("rua").is_some_and(|v| valid_urilist(v));
    let (p, sp, p_defaulted) = if policy("p").is_none() || invalid("sp") {
        // RFC 7489 §6.6.3: act as if `v=DMARC1; p=none` was retrieved when `rua=` is
        // valid; otherwise apply no DMARC processing.
        (has_rua.then_some(Policy::None), None, has_rua)
    } else {
        (policy("p"), policy("sp"), false)
    };
    let pct = tags
        .get("pct")
        .filter(|v| !v.is_empty() && v.bytes().all(|b| b.is_ascii_digit()))
        .and_then(|v| v.parse::<u8>().ok())
        .filter(|&n| n <= 100)
        .unwrap_or(100);
    let flag = |k: &str| tags.get(k).map(|v| v.to_ascii_lowercase());
    Some(Record {
        p,
        sp,
        np: if p_defaulted { None } else { policy("np") },
        adkim: mode("adkim"),
        aspf: mode("aspf"),
        pct,
        testing: flag("t").as_deref() == Some("y"),
        psd: match flag("psd").as_deref() {
            Some("y") => Psd::Yes,
            Some("n") => Psd::No,
            _ => Psd::Unknown,
        },
        p_defaulted,
        rua: if has_rua {
            tags.get("rua").map_or(String::new(), |v| v.to_string())
        } else {
            String::new()
        },
        fo: tags
            .get("fo")
            .filter(|v| !v.is_empty())
            .map_or_else(|| "0".to_string(), |v| v.to_string()),
    })
}

/// What the TXT answers at a `_dmarc` name hold (discovery rules: module docs).
fn at_name(texts: &[String]) -> AtName {
    let mut found: Vec<Record> = texts.iter().filter_map(|t| parse_record(t)).collect();
    match found.len() {
        0 => AtName::None,
        1 => AtName::Record(Arc::new(found.remove(0))),
        _ => AtName::Several,
    }
}

/// A lookup that could not be answered (timeout, SERVFAIL...): temporary.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TempFail;

/// Lowercase, no trailing dot, A-labels (RFC 7489 §3.1: domains compared as A-labels).
pub fn normalize(domain: &str) -> String {
    let d = domain.trim().trim_end_matches('.').to_ascii_lowercase();
    if d.is_ascii() {
        return d;
    }
    idna::domain_to_ascii(&d).unwrap_or(d)
}

/// `domain` without its `n` leftmost labels.
fn drop_labels(domain: &str, n: usize) -> &str {
    let mut rest = domain;
    for _ in 0..n {
        match rest.split_once('.') {
            Some((_, r)) => rest = r,
            None => return "",
        }
    }
    rest
}

/// The names a tree walk from `domain` queries (RFC 9989 §4.10): the name itself, then,
/// when it has 8 or more labels, the 7-label name, then one label less each time down to
/// the top-level domain.
pub fn walk_names(domain: &str) -> Vec<&str> {
    let total = domain.split('.').filter(|l| !l.is_empty()).count();
    if total == 0 {
        return Vec::new();
    }
    let mut names = vec![domain];
    let mut count = if total >= 8 { 7 } else { total - 1 };
    while count >= 1 && names.len() < MAX_WALK {
        names.push(drop_labels(domain, total - count));
        count -= 1;
    }
    names
}

/// `id` is `parent` or below it.
fn within(id: &str, parent: &str) -> bool {
    id == parent || id.strip_suffix(parent).is_some_and(|p| p.ends_with('.'))
}

/// DNS for DMARC: the proxy's resolver and the shared cache. Owned (both are shared
/// handles) so that discovery can run as its own task beside DKIM and ARC.
#[derive(Clone)]
pub struct Dns {
    pub resolver: DnsClient,
    pub cache: Arc<DmarcCache>,
    /// The oldest stale answer (serve-stale) this message's DMARC evaluation used.
    pub stale: Arc<StaleMark>,
    /// The message's DNS lookup budget (`[auth] max_dns_lookups`); a lookup past it
    /// fails like a temporary error, which `verify` turns into `permerror`.
    pub budget: Option<Arc<super::budget::DnsBudget>>,
}

impl Dns {
    /// Takes one lookup from the message's budget (always allowed without one).
    fn take(&self) -> bool {
        self.budget.as_ref().is_none_or(|b| b.take())
    }
}

impl Dns {
    /// What is published at `_dmarc.<name>`, from the cache or one TXT query.
    async fn at(&self, name: &str) -> Result<AtName, TempFail> {
        let key = format!("_dmarc.{name}.");
        if let Some(hit) = self.cache.get(key.as_str()) {
            return Ok(hit);
        }
        let Ok(qname) = Name::from_ascii(&key) else {
            // Not a name DNS can hold: nothing can be published there.
            return Ok(AtName::None);
        };
        if !self.take() {
            return Err(TempFail);
        }
        let (value, valid_until) = match self.resolver.lookup(qname, RecordType::TXT).await {
            Ok(answer) => {
                self.stale.note(answer.stale_age);
                let texts: Vec<String> = answer
                    .records
                    .iter()
                    .filter_map(|r| match r {
                        // RFC 7489 §6.6.3 / RFC 7208 §3.3: the strings are concatenated.
                        RData::TXT(txt) => Some(
                            String::from_utf8_lossy(
                                &txt.txt_data.iter().flatten().copied().collect::<Vec<u8>>(),
                            )
                            .into_owned(),
                        ),
                        _ => None,
                    })
                    .collect();
                // A stale answer has no `valid_until`: it never enters the fresh cache.
                (at_name(&texts), answer.valid_until)
            }
            Err(e) => {
                tracing::debug!(%name, error = %e, "DMARC record lookup failed");
                return Err(TempFail);
            }
        };
        if let Some(until) = valid_until {
            self.cache
                .insert(key.into_boxed_str(), value.clone(), until);
        }
        Ok(value)
    }

    /// RFC 9091 §2.7 / RFC 9989: a domain is non-existent when A, AAAA and MX all give
    /// NXDOMAIN or NODATA. `None`: a lookup failed, existence unknown.
    async fn exists(&self, domain: &str) -> Option<bool> {
        let name = Name::from_ascii(format!("{domain}.")).ok()?;
        for rtype in [RecordType::A, RecordType::AAAA, RecordType::MX] {
            if !self.take() {
                return None;
            }
            match self.resolver.lookup(name.clone(), rtype).await {
                Ok(answer) => {
                    self.stale.note(answer.stale_age);
                    if !answer.records.is_empty() {
                        return Some(true);
                    }
                }
                Err(_) => return None,
            }
        }
        Some(false)
    }
}

/// The policy record that applies to a From domain.
struct Discovered {
    /// Where it was found.
    name: String,
    record: Arc<Record>,
}

/// One message's evaluation state: memoised organizational domains.
struct Evaluator<'a> {
    dns: &'a Dns,
    from: String,
    orgs: HashMap<String, Result<String, TempFail>>,
    /// Walks not finished by then are temporary failures.
    deadline: Option<tokio::time::Instant>,
}

impl Evaluator<'_> {
    /// RFC 9989 §4.10.1: the first record on the walk from the From domain, and the
    /// names on the way that held several (ignored) records.
    async fn discover(&self) -> Result<(Option<Discovered>, Vec<String>), TempFail> {
        let mut several = Vec::new();
        for name in walk_names(&self.from) {
            match self.dns.at(name).await? {
                AtName::Record(record) => {
                    let found = Discovered {
                        name: name.to_string(),
                        record,
                    };
                    return Ok((Some(found), several));
                }
                AtName::Several => several.push(name.to_string()),
                AtName::None => {}
            }
        }
        Ok((None, several))
    }

    /// RFC 9989 §4.10.2: the organizational domain of `domain`, by tree walk. A record
    /// with `psd=n` marks the organizational domain; one with `psd=y` marks a public
    /// suffix domain, the organizational domain being one label below it; otherwise the
    /// record with the fewest labels; with no record at all, the domain itself.
    async fn org(&mut self, domain: &str) -> Result<String, TempFail> {
        if let Some(known) = self.orgs.get(domain) {
            return known.clone();
        }
        let result = match self.deadline {
            // Past the deadline `timeout_at` still polls once: a walk answered from the
            // cache completes.
            Some(d) => tokio::time::timeout_at(d, self.walk_org(domain))
                .await
                .unwrap_or(Err(TempFail)),
            None => self.walk_org(domain).await,
        };
        self.orgs.insert(domain.to_string(), result.clone());
        result
    }

    async fn walk_org(&self, domain: &str) -> Result<String, TempFail> {
        let total = domain.split('.').count();
        let mut fewest: Option<&str> = None;
        for name in walk_names(domain) {
            let AtName::Record(record) = self.dns.at(name).await? else {
                continue;
            };
            match record.psd {
                Psd::No => return Ok(name.to_string()),
                Psd::Yes if name != domain => {
                    let depth = name.split('.').count() + 1;
                    return Ok(drop_labels(domain, total.saturating_sub(depth)).to_string());
                }
                _ => fewest = Some(name),
            }
        }
        Ok(fewest.unwrap_or(domain).to_string())
    }

    /// RFC 7489 §3.1: `id` aligns with the From domain: equal (strict), or the same
    /// organizational domain (relaxed). Only identifiers under the From domain's
    /// organizational domain are walked.
    async fn aligned(&mut self, id: &str, mode: Mode) -> Result<bool, TempFail> {
        let id = normalize(id);
        if id == self.from {
            return Ok(true);
        }
        if mode == Mode::Strict || id.is_empty() {
            return Ok(false);
        }
        // Every organizational domain of the From domain ends in its last label: an
        // identifier that does not can never align, whatever DNS says (so it needs no
        // lookup, and a failed walk cannot make it look alignable).
        let last = |d: &str| d.rsplit('.').next().map(str::to_string);
        if last(&id) != last(&self.from) {
            return Ok(false);
        }
        let from = self.from.clone();
        let org = self.org(&from).await?;
        if !within(&id, &org) {
            return Ok(false);
        }
        Ok(self.org(&id).await? == org)
    }
}

/// What DMARC evaluation needs from the other checks.
pub struct DmarcInput<'a> {
    /// SPF for the MAIL FROM identity (HELO's for the null sender).
    pub spf: &'a SpfCheck,
    /// Final per-signature DKIM results: only `pass` aligns.
    pub dkim: &'a [DkimCheck],
    /// The most recent set of a validated ARC chain, if any.
    pub arc: Option<&'a ArcLatest>,
    /// `[auth] trusted_arc_sealers`.
    pub trusted_sealers: &'a [String],
}

/// The DMARC check, and the ARC sealer whose most recent set vouched for this From
/// domain (for the `arc_sealer` policy condition), if one did.
pub struct DmarcOutcome {
    pub check: DmarcCheck,
    pub vouching_sealer: Option<String>,
}

/// Whether a failing message is in the `pct` sample.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Sample {
    In,
    Out,
}

/// Policy discovery for one From domain, done before the other checks' results are
/// known (it needs none of them): the policy record, and the From domain's
/// organizational domain when there is a record (relaxed alignment needs it).
pub struct Discovery {
    from: String,
    found: Result<(Option<Discovered>, Vec<String>), TempFail>,
    /// The published policy that applies to the From domain, when the record has one.
    published: Option<Policy>,
    orgs: HashMap<String, Result<String, TempFail>>,
}

/// Discovers the policy for `from_domain` (the RFC 5322.From domain to evaluate; ""
/// when there is none).
pub async fn discover(dns: &Dns, from_domain: &str) -> Discovery {
    let mut ev = Evaluator {
        dns,
        from: normalize(from_domain),
        orgs: HashMap::new(),
        deadline: None,
    };
    if ev.from.is_empty() {
        return Discovery {
            from: ev.from,
            found: Ok((None, Vec::new())),
            published: None,
            orgs: ev.orgs,
        };
    }
    let found = ev.discover().await;
    let mut published = None;
    if let Ok((Some(found), _)) = &found {
        if let Some(p) = found.record.p {
            published = Some(published_policy(dns, &ev.from, found, p).await);
        }
        let from = ev.from.clone();
        // Memoised, errors included: `decide` then needs no DNS for identifiers outside
        // the From domain's organization, even once the time budget is spent.
        let _ = ev.org(&from).await;
    }
    Discovery {
        from: ev.from,
        found,
        published,
        orgs: ev.orgs,
    }
}

/// DMARC for `from_domain`: [`discover`] then [`decide`].
pub async fn evaluate(dns: &Dns, from_domain: &str, input: &DmarcInput<'_>) -> DmarcOutcome {
    let discovery = discover(dns, from_domain).await;
    decide(dns, discovery, input, None).await
}

/// The verdict from a discovery and the other checks' results. The `pct` sample is a
/// random draw per message (`rand`'s thread-local CSPRNG): a message is in it with
/// probability pct/100, so `pct=0` never and `pct=100` always applies the published
/// policy. The only DNS left here is the organizational-domain walk of an identifier
/// under the From domain's organizational domain (relaxed alignment); one not finished
/// by `deadline` is a temporary failure: `temperror` if the identifier passed or had a
/// temperror itself, no vouching if an ARC set claimed it.
pub async fn decide(
    dns: &Dns,
    discovery: Discovery,
    input: &DmarcInput<'_>,
    deadline: Option<tokio::time::Instant>,
) -> DmarcOutcome {
    let draw = |pct| rand::random_range(0..100u8) < pct;
    decide_with(dns, discovery, input, deadline, draw).await
}

async fn decide_with(
    dns: &Dns,
    discovery: Discovery,
    input: &DmarcInput<'_>,
    deadline: Option<tokio::time::Instant>,
    sample: impl Fn(u8) -> bool,
) -> DmarcOutcome {
    let from = discovery.from.clone();
    let mut check = DmarcCheck::without_record(AuthResult::None, from.clone());
    let published = discovery.published;
    let mut ev = Evaluator {
        dns,
        from: discovery.from,
        orgs: discovery.orgs,
        deadline,
    };
    let (found, several) = match discovery.found {
        Ok(found) => found,
        Err(TempFail) => {
            check.result = AuthResult::TempError;
            check.reason = Some("DMARC record lookup failed".into());
            return DmarcOutcome {
                check,
                vouching_sealer: None,
            };
        }
    };
    let mut notes: Vec<String> = several
        .iter()
        .map(|n| format!("several DMARC records at _dmarc.{n} ignored"))
        .collect();
    let Some(found) = found else {
        check.reason = (!notes.is_empty()).then(|| notes.join("; "));
        return DmarcOutcome {
            check,
            vouching_sealer: None,
        };
    };
    let record = Arc::clone(&found.record);
    let (Some(_), Some(published)) = (record.p, published) else {
        notes.push(format!(
            "record at _dmarc.{} has no valid p= and no valid rua=: DMARC does not apply",
            found.name
        ));
        check.reason = Some(notes.join("; "));
        return DmarcOutcome {
            check,
            vouching_sealer: None,
        };
    };
    if record.p_defaulted {
        notes.push("invalid or missing p=/sp= with a valid rua=: treated as p=none".into());
    }
    if found.name != from {
        check.policy_domain = Some(found.name.clone());
    }
    check.published_policy = Some(published.as_str());
    let aligned = alignment_result(&mut ev, input, &record).await;
    check.result = aligned.result;
    check.spf_aligned = aligned.spf;
    check.dkim_aligned = aligned.dkim;
    check.record = Some(Arc::clone(&record));
    check.record_domain = Some(found.name.clone());
    let vouching_sealer = match input.arc {
        Some(latest) => vouches(&mut ev, latest, &record)
            .await
            .then(|| latest.sealer.clone()),
        None => None,
    };
    let mut applied = published;
    if check.result == AuthResult::Fail {
        // pct=100 (the default) never consults the draw.
        let sampled = if record.pct >= 100 || sample(record.pct) {
            Sample::In
        } else {
            Sample::Out
        };
        if record.pct < 100 {
            check.pct = Some(record.pct);
            check.pct_sampled = Some(sampled == Sample::In);
        }
        check.testing = record.testing;
        if sampled == Sample::Out || record.testing {
            applied = applied.lower();
        }
        if let Some(sealer) = vouching_sealer
            .as_deref()
            .filter(|s| super::arc::trusted(s, input.trusted_sealers))
        {
            applied = Policy::None;
            check.arc_override = Some(sealer.to_string());
        }
        if sampled == Sample::Out {
            notes.push(format!("not in the pct={} sample", record.pct));
        }
    }
    check.policy = Some(applied.as_str());
    if !notes.is_empty() {
        check.reason = Some(notes.join("; "));
    }
    DmarcOutcome {
        check,
        vouching_sealer,
    }
}

/// The published policy for the From domain: `p` at the domain itself, else `np` for a
/// non-existent subdomain, `sp` for an existing one (RFC 9989 §4.10.1 / §5.3.4).
async fn published_policy(dns: &Dns, from: &str, found: &Discovered, p: Policy) -> Policy {
    let record = &found.record;
    if found.name == from {
        return p;
    }
    let sp = record.sp.unwrap_or(p);
    let np = record.np.unwrap_or(sp);
    if np == sp {
        return sp;
    }
    match dns.exists(from).await {
        Some(true) => sp,
        Some(false) => np,
        // Existence unknown: the stricter of the two.
        None => sp.max(np),
    }
}

/// The DMARC result, and which mechanisms produced an aligned pass (aggregate reports
/// give both, `policy_evaluated` `spf` and `dkim`, so neither stops at the first pass).
struct Aligned {
    result: AuthResult,
    spf: bool,
    dkim: bool,
}

/// RFC 7489 §4.2 / §6.6.2: pass when an aligned identifier passed; temperror when none
/// did and an aligned identifier (or the alignment check itself) had a temporary error;
/// fail otherwise. Identifiers that cannot align never make it a temperror.
async fn alignment_result(
    ev: &mut Evaluator<'_>,
    input: &DmarcInput<'_>,
    record: &Record,
) -> Aligned {
    let mut temp = false;
    let (mut spf_pass, mut dkim_pass) = (false, false);
    let spf = input.spf;
    if matches!(spf.result, AuthResult::Pass | AuthResult::TempError) {
        match ev.aligned(&spf.domain, record.aspf).await {
            Ok(true) if spf.result == AuthResult::Pass => spf_pass = true,
            Ok(true) | Err(TempFail) => temp = true,
            Ok(false) => {}
        }
    }
    for d in input.dkim {
        if !matches!(d.result, AuthResult::Pass | AuthResult::TempError) || d.domain.is_empty() {
            continue;
        }
        match ev.aligned(&d.domain, record.adkim).await {
            Ok(true) if d.result == AuthResult::Pass => {
                dkim_pass = true;
                break;
            }
            Ok(true) | Err(TempFail) => temp = true,
            Ok(false) => {}
        }
    }
    let result = if spf_pass || dkim_pass {
        AuthResult::Pass
    } else if temp {
        AuthResult::TempError
    } else {
        AuthResult::Fail
    };
    Aligned {
        result,
        spf: spf_pass,
        dkim: dkim_pass,
    }
}

/// Whether the most recent ARC set recorded a pass for this From domain: a `dmarc=pass`
/// with `header.from` equal to ours, or a DKIM/SPF pass whose domain aligns with it under
/// the record's modes; and no other DMARC result for our domain.
async fn vouches(ev: &mut Evaluator<'_>, latest: &ArcLatest, record: &Record) -> bool {
    let claims = latest.claims(&ev.from);
    if claims.dmarc_other {
        return false;
    }
    if claims.dmarc_pass {
        return true;
    }
    for d in &claims.dkim_pass {
        if ev.aligned(d, record.adkim).await == Ok(true) {
            return true;
        }
    }
    for d in &claims.spf_pass {
        if ev.aligned(d, record.aspf).await == Ok(true) {
            return true;
        }
    }
    false
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::auth::spf::test_dns::{DnsServer, Zone};
    use crate::config::DnsConfig;

    #[test]
    fn record_syntax() {
        assert!(parse_record("v=spf1 -all").is_none());
        assert!(parse_record("x v=DMARC1; p=reject").is_none());
        assert!(parse_record("v=DMARC1x; p=reject").is_none());
        assert!(
            parse_record("v=dmarc1; p=reject").is_none(),
            "DMARC1 is case-sensitive"
        );
        let r = parse_record("v = DMARC1 ;P=Reject; sp=quarantine; adkim=s; pct=20; t=y").unwrap();
        assert_eq!(r.p, Some(Policy::Reject));
        assert_eq!(r.sp, Some(Policy::Quarantine));
        assert_eq!(r.adkim, Mode::Strict);
        assert_eq!(r.aspf, Mode::Relaxed);
        assert_eq!(r.pct, 20);
        assert!(r.testing);
        // Invalid values of other tags take their defaults.
        let r = parse_record("v=DMARC1; p=reject; pct=101; adkim=x; t=maybe").unwrap();
        assert_eq!((r.pct, r.adkim, r.testing), (100, Mode::Relaxed, false));
        assert_eq!(parse_record("v=DMARC1; p=reject; pct=-1").unwrap().pct, 100);
        assert_eq!(parse_record("v=DMARC1; p=reject; pct=0").unwrap().pct, 0);
    }

    #[test]
    fn invalid_p_with_valid_rua_is_p_none() {
        for text in [
            "v=DMARC1; p=rejectt; rua=mailto:d@bank.example",
            "v=DMARC1; rua=mailto:d@bank.example",
            "v=DMARC1; p=reject; sp=bogus; rua=mailto:d@bank.example!10m",
        ] {
            let r = parse_record(text).unwrap();
            assert_eq!(r.p, Some(Policy::None), "{text}");
            assert!(r.p_defaulted);
            assert_eq!(r.sp, None);
        }
        // Without a valid rua=, DMARC does not apply.
        for text in [
            "v=DMARC1; p=rejectt",
            "v=DMARC1; p=bogus; rua=not a uri",
            "v=DMARC1; p=reject; sp=bogus",
        ] {
            assert_eq!(parse_record(text).unwrap().p, None, "{text}");
        }
    }

    #[test]
    fn two_records_at_a_name_are_none_usable() {
        let t = |v: &[&str]| at_name(&v.iter().map(|s| s.to_string()).collect::<Vec<_>>());
        assert_eq!(
            t(&["v=DMARC1; p=reject", "v=DMARC1; p=none"]),
            AtName::Several
        );
        assert!(matches!(
            t(&["v=DMARC1; p=reject", "some-verification=abc", "v=spf1 -all"]),
            AtName::Record(_)
        ));
        assert_eq!(t(&["hello"]), AtName::None);
    }

    #[test]
    fn walk_names_follow_rfc9989() {
        assert_eq!(
            walk_names("a.b.example.com"),
            ["a.b.example.com", "b.example.com", "example.com", "com"]
        );
        let long = "1.2.3.4.5.6.7.8.9.example.com";
        let names = walk_names(long);
        assert_eq!(names[0], long);
        assert_eq!(names[1], "5.6.7.8.9.example.com");
        assert_eq!(names.last(), Some(&"com"));
        assert_eq!(names.len(), 8);
    }

    /// A resolver without hickory's cache (every lookup the DMARC cache does not answer
    /// reaches the server) and a fresh DMARC cache.
    fn dns_for(server: &DnsServer) -> Dns {
        let cfg = DnsConfig {
            nameservers: vec![server.addr()],
            timeout_ms: 300,
            attempts: 1,
            cache_entries: 0,
            ..DnsConfig::default()
        };
        Dns {
            resolver: DnsClient::new(&cfg).unwrap(),
            cache: Arc::new(DmarcCache::new(100)),
            stale: Arc::default(),
            budget: None,
        }
    }

    fn spf(result: AuthResult, domain: &str) -> SpfCheck {
        SpfCheck {
            result,
            domain: domain.into(),
        }
    }

    fn dkim(result: AuthResult, domain: &str) -> DkimCheck {
        DkimCheck {
            result,
            domain: domain.into(),
            selector: "s".into(),
            algorithm: "rsa-sha256".into(),
            reason: None,
            stale_secs: None,
        }
    }

    fn zone() -> Zone {
        Zone::new()
            .txt(
                "_dmarc.bank.example",
                "v=DMARC1; p=reject; sp=quarantine; np=reject",
            )
            .a("www.bank.example", "192.0.2.1")
            .txt(
                "_dmarc.strict.example",
                "v=DMARC1; p=reject; adkim=s; aspf=s",
            )
            .txt("_dmarc.two.example", "v=DMARC1; p=reject")
            .txt("_dmarc.two.example", "v=DMARC1; p=none")
            .txt("_dmarc.sub.parent.example", "v=DMARC1; p=reject")
            .txt("_dmarc.sub.parent.example", "v=DMARC1; p=reject")
            .txt("_dmarc.parent.example", "v=DMARC1; p=quarantine")
            .txt("_dmarc.pct0.example", "v=DMARC1; p=reject; pct=0")
            .txt("_dmarc.pct100.example", "v=DMARC1; p=reject; pct=100")
            .txt("_dmarc.pct50.example", "v=DMARC1; p=reject; pct=50")
            .txt("_dmarc.test.example", "v=DMARC1; p=quarantine; t=y")
            .txt(
                "_dmarc.rua.example",
                "v=DMARC1; p=hold; rua=mailto:r@rua.example",
            )
            .txt("_dmarc.psd.example", "v=DMARC1; p=none; psd=y")
            .timeout("_dmarc.slow.example")
            .timeout("s._domainkey.attacker.example")
    }

    async fn eval_with(
        server: &DnsServer,
        from: &str,
        spf_c: SpfCheck,
        dkim_c: Vec<DkimCheck>,
        sample: bool,
    ) -> DmarcCheck {
        let dns = dns_for(server);
        let input = DmarcInput {
            spf: &spf_c,
            dkim: &dkim_c,
            arc: None,
            trusted_sealers: &[],
        };
        let discovery = discover(&dns, from).await;
        decide_with(&dns, discovery, &input, None, |_| sample)
            .await
            .check
    }

    async fn eval(
        server: &DnsServer,
        from: &str,
        spf_c: SpfCheck,
        dkim_c: Vec<DkimCheck>,
    ) -> DmarcCheck {
        eval_with(server, from, spf_c, dkim_c, true).await
    }

    #[tokio::test]
    async fn alignment_and_policies() {
        let server = DnsServer::start(zone());
        let none = spf(AuthResult::Fail, "attacker.example");
        // Relaxed: a subdomain's DKIM aligns through the tree-walk organizational domain.
        let c = eval(
            &server,
            "bank.example",
            none.clone(),
            vec![dkim(AuthResult::Pass, "mail.bank.example")],
        )
        .await;
        assert_eq!(c.result, AuthResult::Pass);
        // A look-alike suffix is not under the organizational domain.
        let c = eval(
            &server,
            "bank.example",
            none.clone(),
            vec![dkim(AuthResult::Pass, "evilbank.example")],
        )
        .await;
        assert_eq!((c.result, c.policy), (AuthResult::Fail, Some("reject")));
        // Strict: only the exact domain.
        let c = eval(
            &server,
            "strict.example",
            spf(AuthResult::Pass, "mail.strict.example"),
            vec![],
        )
        .await;
        assert_eq!(c.result, AuthResult::Fail);
        let c = eval(
            &server,
            "strict.example",
            spf(AuthResult::Pass, "STRICT.example."),
            vec![],
        )
        .await;
        assert_eq!(c.result, AuthResult::Pass);
        // Only pass aligns: a `policy` (l= with appended content) or fail never does.
        let c = eval(
            &server,
            "bank.example",
            none.clone(),
            vec![
                dkim(AuthResult::Policy, "bank.example"),
                dkim(AuthResult::Fail, "bank.example"),
            ],
        )
        .await;
        assert_eq!(c.result, AuthResult::Fail);
        // sp= for an existing subdomain, np= for a non-existent one.
        let c = eval(&server, "www.bank.example", none.clone(), vec![]).await;
        assert_eq!(
            (c.result, c.published_policy, c.policy_domain.as_deref()),
            (AuthResult::Fail, Some("quarantine"), Some("bank.example"))
        );
        let c = eval(&server, "nx.bank.example", none.clone(), vec![]).await;
        assert_eq!(c.published_policy, Some("reject"));
        // No record anywhere: none.
        let c = eval(&server, "nothing.example", none.clone(), vec![]).await;
        assert_eq!((c.result, c.policy), (AuthResult::None, None));
    }

    #[tokio::test]
    async fn record_discovery_rules() {
        let server = DnsServer::start(zone());
        let none = spf(AuthResult::Fail, "attacker.example");
        // Two records: no usable record at that name, and nothing above it.
        let c = eval(&server, "two.example", none.clone(), vec![]).await;
        assert_eq!((c.result, c.policy), (AuthResult::None, None), "{c:?}");
        assert!(
            c.reason.as_deref().unwrap_or("").contains("several"),
            "{c:?}"
        );
        // Two records at the subdomain: the walk goes on to the parent's record.
        let c = eval(&server, "sub.parent.example", none.clone(), vec![]).await;
        assert_eq!(
            (c.result, c.published_policy),
            (AuthResult::Fail, Some("quarantine"))
        );
        // Invalid p= with a valid rua=: p=none, not permerror.
        let c = eval(&server, "rua.example", none.clone(), vec![]).await;
        assert_eq!((c.result, c.policy), (AuthResult::Fail, Some("none")));
        // The record lookup itself failing: temperror.
        let c = eval(&server, "slow.example", none.clone(), vec![]).await;
        assert_eq!(c.result, AuthResult::TempError);
    }

    #[tokio::test]
    async fn pct_and_testing_apply_the_next_lower_policy() {
        let server = DnsServer::start(zone());
        let none = spf(AuthResult::Fail, "attacker.example");
        // pct=0: whatever the draw says, never reject (the real draw: `evaluate`).
        let dns = dns_for(&server);
        for _ in 0..20 {
            let input = DmarcInput {
                spf: &none,
                dkim: &[],
                arc: None,
                trusted_sealers: &[],
            };
            let c = evaluate(&dns, "pct0.example", &input).await.check;
            assert_eq!(
                (c.published_policy, c.policy, c.pct, c.pct_sampled),
                (Some("reject"), Some("quarantine"), Some(0), Some(false))
            );
            let c = evaluate(&dns, "pct100.example", &input).await.check;
            assert_eq!(
                (c.published_policy, c.policy, c.pct),
                (Some("reject"), Some("reject"), None)
            );
        }
        // pct=50 with the real draw: per message, so both outcomes show up (the chance
        // that 200 draws all agree is 2^-199).
        let input = DmarcInput {
            spf: &none,
            dkim: &[],
            arc: None,
            trusted_sealers: &[],
        };
        let mut seen = std::collections::BTreeSet::new();
        for _ in 0..200 {
            seen.insert(evaluate(&dns, "pct50.example", &input).await.check.policy);
        }
        assert_eq!(seen.len(), 2, "{seen:?}");
        // pct=50: the draw decides.
        let c = eval_with(&server, "pct50.example", none.clone(), vec![], true).await;
        assert_eq!((c.policy, c.pct_sampled), (Some("reject"), Some(true)));
        let c = eval_with(&server, "pct50.example", none.clone(), vec![], false).await;
        assert_eq!((c.policy, c.pct_sampled), (Some("quarantine"), Some(false)));
        let c = eval_with(&server, "bank.example", none.clone(), vec![], false).await;
        assert_eq!(
            c.policy,
            Some("reject"),
            "pct absent is 100: the draw is not consulted"
        );
        let c = eval(&server, "test.example", none.clone(), vec![]).await;
        assert_eq!(
            (c.published_policy, c.policy, c.testing),
            (Some("quarantine"), Some("none"), true)
        );
    }

    #[tokio::test]
    async fn only_alignable_identifiers_make_temperror() {
        let server = DnsServer::start(zone());
        // An attacker's own signature whose key timed out: still a fail.
        let c = eval(
            &server,
            "bank.example",
            spf(AuthResult::Fail, "attacker.example"),
            vec![dkim(AuthResult::TempError, "attacker.example")],
        )
        .await;
        assert_eq!((c.result, c.policy), (AuthResult::Fail, Some("reject")));
        // SPF temperror for an unrelated MAIL FROM domain: still a fail.
        let c = eval(
            &server,
            "bank.example",
            spf(AuthResult::TempError, "attacker.example"),
            vec![],
        )
        .await;
        assert_eq!(c.result, AuthResult::Fail);
        // Aligned DKIM or SPF temperror: temperror.
        let c = eval(
            &server,
            "bank.example",
            spf(AuthResult::Fail, "attacker.example"),
            vec![dkim(AuthResult::TempError, "bank.example")],
        )
        .await;
        assert_eq!(c.result, AuthResult::TempError);
        let c = eval(
            &server,
            "bank.example",
            spf(AuthResult::TempError, "mail.bank.example"),
            vec![],
        )
        .await;
        assert_eq!(c.result, AuthResult::TempError);
        // An aligned pass wins over another identifier's temperror.
        let c = eval(
            &server,
            "bank.example",
            spf(AuthResult::TempError, "bank.example"),
            vec![dkim(AuthResult::Pass, "bank.example")],
        )
        .await;
        assert_eq!(c.result, AuthResult::Pass);
    }

    #[tokio::test]
    async fn decide_keeps_to_the_deadline() {
        let server = DnsServer::start(zone());
        let dns = dns_for(&server);
        let spf_c = spf(AuthResult::Fail, "attacker.example");
        let past = Some(tokio::time::Instant::now());
        let decide_past = |dkim_c: Vec<DkimCheck>| {
            let (dns, spf_c) = (dns.clone(), spf_c.clone());
            async move {
                let discovery = discover(&dns, "bank.example").await;
                let input = DmarcInput {
                    spf: &spf_c,
                    dkim: &dkim_c,
                    arc: None,
                    trusted_sealers: &[],
                };
                decide_with(&dns, discovery, &input, past, |_| true)
                    .await
                    .check
            }
        };
        // Everything needed was found by discovery: decided even past the deadline.
        let c = decide_past(vec![dkim(AuthResult::TempError, "attacker.example")]).await;
        assert_eq!((c.result, c.policy), (AuthResult::Fail, Some("reject")));
        let c = decide_past(vec![dkim(AuthResult::Pass, "bank.example")]).await;
        assert_eq!(c.result, AuthResult::Pass);
        // A subdomain's pass needs one more walk, which the deadline cuts: temperror.
        let c = decide_past(vec![dkim(AuthResult::Pass, "fresh.bank.example")]).await;
        assert_eq!(c.result, AuthResult::TempError);
    }

    #[tokio::test]
    async fn psd_records_bound_the_organizational_domain() {
        // psd.example is a public suffix: a.psd.example and b.psd.example are different
        // organizations and never align in relaxed mode.
        let server = DnsServer::start(zone());
        let dns = dns_for(&server);
        let mut ev = Evaluator {
            dns: &dns,
            from: "a.psd.example".into(),
            orgs: HashMap::new(),
            deadline: None,
        };
        assert_eq!(ev.org("x.a.psd.example").await, Ok("a.psd.example".into()));
        assert_eq!(ev.aligned("b.psd.example", Mode::Relaxed).await, Ok(false));
        // Another top-level domain: no walk at all.
        let before = server.query_count();
        assert_eq!(ev.aligned("attacker.test", Mode::Relaxed).await, Ok(false));
        assert_eq!(server.query_count(), before);
        assert_eq!(ev.aligned("x.a.psd.example", Mode::Relaxed).await, Ok(true));
        assert_eq!(ev.org("www.bank.example").await, Ok("bank.example".into()));
        assert_eq!(
            ev.org("nothing.example").await,
            Ok("nothing.example".into())
        );
    }

    #[tokio::test]
    async fn records_are_cached_errors_are_not() {
        let server = DnsServer::start(zone());
        let dns = dns_for(&server);
        assert!(matches!(
            dns.at("bank.example").await,
            Ok(AtName::Record(_))
        ));
        let before = server.queries_for("_dmarc.bank.example");
        assert!(matches!(
            dns.at("bank.example").await,
            Ok(AtName::Record(_))
        ));
        assert_eq!(server.queries_for("_dmarc.bank.example"), before);
        assert_eq!(dns.at("slow.example").await, Err(TempFail));
        assert!(dns.cache.get("_dmarc.slow.example.").is_none());
    }
}
