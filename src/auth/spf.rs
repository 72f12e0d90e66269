//! SPF: the `check_host()` function of RFC 7208, written from the RFC.
//!
//! * record lookup and selection (§4.4, §4.5): TXT only, exactly one `v=spf1` record;
//! * strict record syntax (§4.6.1, §5, §6, §7.1, the ABNF of §12): every term of the
//!   record is parsed before anything is evaluated, any error is `permerror`;
//! * evaluation (§4.6.2, §5, §6.1) with the processing limits of §4.6.4: at most 10
//!   DNS-querying terms, 10 MX / PTR names per term and 2 void lookups per check;
//! * macro expansion (§7).
//!
//! Explanations (`exp=`, §6.2) are parsed and syntax-checked but never fetched: the proxy
//! does not produce SMTP explanation texts. DNS goes through the proxy's hickory resolver;
//! every name is queried as an absolute name. NXDOMAIN and "no answer" are both "no
//! records" (a void lookup, §4.6.4); any other DNS failure or a timeout is `temperror`.
//!
//! Parsed records are kept between messages in an [`SpfCache`] (by lowercased domain, for
//! the TXT answer's TTL): the outcome of the record lookup (§4.4, §4.5) and of parsing
//! (§4.6) is a function of the TXT answer alone, so a cached outcome gives the same result
//! as a new lookup of the same answer. "No records" (NXDOMAIN, NODATA) is cached for the
//! negative TTL of the SOA in the answer, at most [`NEGATIVE_TTL_MAX`], and not at all
//! without an SOA (RFC 2308 §5); a DNS error or a timeout is never cached. The other
//! lookups (A, AAAA, MX, PTR, `exists`) go to hickory, whose cache respects TTLs too.

use std::future::Future;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::pin::Pin;
use std::sync::Arc;
use std::time::{Duration, Instant};

use hickory_resolver::proto::rr::{Name, RData, RecordType};

use super::AuthResult;
use super::budget::DnsBudget;
use super::cache::TtlCache;
use super::dns::DnsClient;
use super::stale::StaleMark;

/// §4.6.4: terms that cause DNS queries, per check_host() evaluation (with includes and
/// redirects).
const MAX_DNS_TERMS: u32 = 10;
/// §4.6.4: MX or PTR names looked at by one `mx` / `ptr` term (or one `%{p}`).
const MAX_NAMES_PER_TERM: usize = 10;
/// §4.6.4: lookups that return NXDOMAIN or no answers.
const MAX_VOID_LOOKUPS: u32 = 2;
/// Longest time "this domain has no TXT records" is cached (RFC 2308 negative caching,
/// kept short so that a newly published record is seen soon).
pub const NEGATIVE_TTL_MAX: Duration = Duration::from_secs(60);

/// Parsed SPF records (and the absence of one) by lowercased domain, for the DNS TTL;
/// bounded ([`TtlCache`]). One per process, shared by every check.
pub struct SpfCache(TtlCache<Box<str>, CachedRecord>);

impl SpfCache {
    /// A cache of at most `capacity` domains; 0 caches nothing.
    pub fn new(capacity: usize) -> SpfCache {
        SpfCache(TtlCache::new(capacity))
    }

    /// Domains currently cached (expired entries included).
    pub fn len(&self) -> usize {
        self.0.len()
    }

    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }
}

/// The outcome of the record lookup and parse of one domain (§4.4 to §4.6).
#[derive(Clone)]
enum CachedRecord {
    Found(Arc<Record>),
    /// No `v=spf1` record: no TXT records, or none of them is one.
    Missing,
    /// `permerror` (the reason is logged at each use, as it was found).
    MoreThanOne,
    NotUtf8,
    Syntax(Arc<str>),
}

/// The inputs of check_host() (§4.1) plus the HELO name and our own name for macros.
pub struct SpfRequest<'a> {
    /// The SMTP client's address (an IPv4-mapped IPv6 address counts as IPv4, §5).
    pub ip: IpAddr,
    /// The domain whose record is checked: MAIL FROM's domain or the HELO name.
    pub domain: &'a str,
    /// `local@domain`, or `postmaster@helo` for the HELO identity / null sender (§2.4).
    pub sender: &'a str,
    pub helo: &'a str,
    /// Our host name, the `%{r}` macro.
    pub receiver: &'a str,
    /// The message's DNS lookup count ([`super::budget`]): every query takes one; past
    /// the limit the evaluation ends in `permerror`. `None`: not counted.
    pub budget: Option<&'a DnsBudget>,
}

/// Evaluates the SPF record of `req.domain` for `req.ip` (RFC 7208 §4).
pub async fn check_host(dns: &DnsClient, cache: &SpfCache, req: &SpfRequest<'_>) -> AuthResult {
    check_host_marked(dns, cache, req, &StaleMark::default()).await
}

/// [`check_host`], noting in `stale` the oldest stale answer it used (serve-stale).
pub async fn check_host_marked(
    dns: &DnsClient,
    cache: &SpfCache,
    req: &SpfRequest<'_>,
    stale: &StaleMark,
) -> AuthResult {
    let (local, sender_domain) = match req.sender.rsplit_once('@') {
        // §4.3: a sender without a local-part is postmaster@domain.
        Some(("", d)) => ("postmaster", d),
        Some((l, d)) => (l, d),
        None => ("postmaster", req.domain),
    };
    let mut eval = Evaluator {
        dns,
        stale,
        cache,
        ip: req.ip.to_canonical(),
        local,
        sender_domain,
        helo: req.helo,
        receiver: req.receiver,
        budget: req.budget,
        dns_terms: 0,
        void_lookups: 0,
    };
    // §4.3: internationalized names are looked up as A-labels.
    let domain = if req.domain.is_ascii() {
        req.domain.to_string()
    } else {
        match idna::domain_to_ascii(req.domain) {
            Ok(d) => d,
            Err(_) => return AuthResult::None,
        }
    };
    match eval.check(domain).await {
        Ok(r) => r,
        Err(Abort::Temp) => AuthResult::TempError,
        Err(Abort::Perm) => AuthResult::PermError,
    }
}

/// Why an evaluation stopped early: the result words of §2.6.6 and §2.6.7.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Abort {
    Temp,
    Perm,
}

// ---------------------------------------------------------------------------------------
// Record syntax (§4.6.1, §5, §6, §12)
// ---------------------------------------------------------------------------------------

/// The mechanisms of §5; `None` domains mean "the current <domain>".
#[derive(Debug, Clone, PartialEq, Eq)]
enum Mechanism {
    All,
    Include(MacroString),
    A(Option<MacroString>, Cidr),
    Mx(Option<MacroString>, Cidr),
    Ptr(Option<MacroString>),
    Ip4(Ipv4Addr, u8),
    Ip6(Ipv6Addr, u8),
    Exists(MacroString),
}

/// `dual-cidr-length` (§5.6): prefix lengths for IPv4 and for IPv6 addresses.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Cidr {
    v4: u8,
    v6: u8,
}

impl Cidr {
    const FULL: Cidr = Cidr { v4: 32, v6: 128 };

    /// Whether `ip` and `net` (same address family) share the prefix.
    fn contains(self, net: IpAddr, ip: IpAddr) -> bool {
        match (net, ip) {
            (IpAddr::V4(n), IpAddr::V4(a)) => {
                let mask = u32::MAX.checked_shl(32 - u32::from(self.v4)).unwrap_or(0);
                u32::from(n) & mask == u32::from(a) & mask
            }
            (IpAddr::V6(n), IpAddr::V6(a)) => {
                let mask = u128::MAX.checked_shl(128 - u32::from(self.v6)).unwrap_or(0);
                u128::from(n) & mask == u128::from(a) & mask
            }
            _ => false,
        }
    }
}

/// A parsed `v=spf1` record.
#[derive(Debug, Default, PartialEq, Eq)]
struct Record {
    /// Each mechanism with its qualifier's result (§4.6.2).
    directives: Vec<(AuthResult, Mechanism)>,
    redirect: Option<MacroString>,
    /// Parsed for its syntax only (§6.2): explanations are not produced.
    exp: Option<MacroString>,
}

/// §4.5: a record is an SPF record if it is `v=spf1` alone or followed by a space.
fn is_spf1(text: &[u8]) -> bool {
    text.len() >= 6
        && text[..6].eq_ignore_ascii_case(b"v=spf1")
        && (text.len() == 6 || text[6] == b' ')
}

/// Parses a whole record (§4.6.1: `record = version terms *SP`, terms separated by one or
/// more spaces, nothing else). Every syntax error anywhere is reported (§4.6).
fn parse_record(text: &str) -> Result<Record, String> {
    if !is_spf1(text.as_bytes()) {
        return Err("not a v=spf1 record".into());
    }
    // §3.1: records are 7-bit ASCII; control characters fail the term syntax below.
    if !text.is_ascii() {
        return Err("non-ASCII character in the record".into());
    }
    let mut record = Record::default();
    for term in text[6..].split(' ').filter(|t| !t.is_empty()) {
        parse_term(term, &mut record)?;
    }
    Ok(record)
}

/// One term: a modifier (`name=value`, §6 and §4.6.1) or a directive (§4.6.2).
fn parse_term(term: &str, record: &mut Record) -> Result<(), String> {
    // name = ALPHA *( ALPHA / DIGIT / "-" / "_" / "." ), immediately followed by "=".
    let name_len = term
        .bytes()
        .take_while(|b| b.is_ascii_alphanumeric() || b"-_.".contains(b))
        .count();
    if let Some(value) = term[name_len..].strip_prefix('=') {
        let name = &term[..name_len];
        if !name.starts_with(|c: char| c.is_ascii_alphabetic()) {
            return Err(format!("invalid modifier name in {term:?}"));
        }
        let slot = match name.to_ascii_lowercase().as_str() {
            "redirect" => &mut record.redirect,
            "exp" => &mut record.exp,
            // §6: unknown modifiers are ignored, but their value must be a macro-string.
            _ => {
                MacroString::parse(value, true)?;
                return Ok(());
            }
        };
        if slot.is_some() {
            return Err(format!("{name}= appears twice (§6)"));
        }
        *slot = Some(parse_domain_spec(value)?);
        return Ok(());
    }

    let (qualifier, rest) = match term.as_bytes()[0] {
        b'+' => (AuthResult::Pass, &term[1..]),
        b'-' => (AuthResult::Fail, &term[1..]),
        b'~' => (AuthResult::SoftFail, &term[1..]),
        b'?' => (AuthResult::Neutral, &term[1..]),
        _ => (AuthResult::Pass, term),
    };
    let name_len = rest.bytes().take_while(u8::is_ascii_alphanumeric).count();
    let (name, arg) = rest.split_at(name_len);
    let bad = || format!("invalid mechanism {term:?}");
    let required_spec = |arg: &str| match arg.strip_prefix(':') {
        Some(spec) => parse_domain_spec(spec),
        None => Err(bad()),
    };
    let optional_spec = |arg: &str| {
        if arg.is_empty() {
            Ok(None)
        } else {
            required_spec(arg).map(Some)
        }
    };
    let mechanism = match name.to_ascii_lowercase().as_str() {
        "all" if arg.is_empty() => Mechanism::All,
        "include" => Mechanism::Include(required_spec(arg)?),
        "exists" => Mechanism::Exists(required_spec(arg)?),
        "ptr" => Mechanism::Ptr(optional_spec(arg)?),
        "a" | "mx" => {
            let (spec, cidr) = split_dual_cidr(arg)?;
            let domain = optional_spec(spec)?;
            if name.eq_ignore_ascii_case("a") {
                Mechanism::A(domain, cidr)
            } else {
                Mechanism::Mx(domain, cidr)
            }
        }
        "ip4" => {
            let net = arg.strip_prefix(':').ok_or_else(bad)?;
            let (addr, len) = match net.split_once('/') {
                Some((addr, len)) => (addr, parse_cidr(len, 32)?),
                None => (net, 32),
            };
            // ip4-network: four decimal octets without leading zeros (std rejects them).
            Mechanism::Ip4(addr.parse().map_err(|_| bad())?, len)
        }
        "ip6" => {
            let net = arg.strip_prefix(':').ok_or_else(bad)?;
            let (addr, len) = match net.split_once('/') {
                Some((addr, len)) => (addr, parse_cidr(len, 128)?),
                None => (net, 128),
            };
            Mechanism::Ip6(addr.parse().map_err(|_| bad())?, len)
        }
        _ => return Err(bad()),
    };
    record.directives.push((qualifier, mechanism));
    Ok(())
}

/// A CIDR length (§5.6): decimal without leading zeros, at most `max`.
fn parse_cidr(digits: &str, max: u8) -> Result<u8, String> {
    let ok = !digits.is_empty()
        && digits.bytes().all(|b| b.is_ascii_digit())
        && (digits == "0" || !digits.starts_with('0'));
    match digits.parse::<u8>() {
        Ok(n) if ok && n <= max => Ok(n),
        _ => Err(format!("invalid CIDR length /{digits}")),
    }
}

/// Splits `[":" domain-spec] [dual-cidr-length]` (§5.3, §5.4) into the domain part and the
/// IPv4 / IPv6 prefix lengths. A domain-spec may itself contain `/`, so the lengths are
/// taken from the end: `dual-cidr-length = [ "/" ip4-len ] [ "//" ip6-len ]`.
fn split_dual_cidr(arg: &str) -> Result<(&str, Cidr), String> {
    // The digits after the last "/" and the text before that "/", if all digits.
    fn last_len(s: &str) -> Option<(&str, &str)> {
        let (head, digits) = s.rsplit_once('/')?;
        (!digits.is_empty() && digits.bytes().all(|b| b.is_ascii_digit())).then_some((head, digits))
    }
    let (mut rest, mut cidr) = (arg, Cidr::FULL);
    if let Some((head, digits)) = last_len(rest) {
        if let Some(head) = head.strip_suffix('/') {
            cidr.v6 = parse_cidr(digits, 128)?;
            rest = head;
            if let Some((head4, digits4)) = last_len(rest).filter(|(h, _)| !h.ends_with('/')) {
                cidr.v4 = parse_cidr(digits4, 32)?;
                rest = head4;
            }
        } else {
            cidr.v4 = parse_cidr(digits, 32)?;
            rest = head;
        }
    }
    Ok((rest, cidr))
}

/// `domain-spec = macro-string domain-end` with
/// `domain-end = ( "." toplabel [ "." ] ) / macro-expand` (§7.1). Macro letters that are
/// only allowed in explanation text (c, r, t) are errors here.
fn parse_domain_spec(text: &str) -> Result<MacroString, String> {
    let spec = MacroString::parse(text, false)?;
    let valid_end = match spec.0.last() {
        None => false,
        Some(Token::Macro(_) | Token::Escape(_)) => true,
        Some(Token::Literal(lit)) => {
            let lit = lit.strip_suffix('.').unwrap_or(lit);
            lit.rsplit_once('.')
                .is_some_and(|(_, top)| is_toplabel(top))
        }
    };
    if valid_end {
        Ok(spec)
    } else {
        Err(format!("invalid domain-spec {text:?}"))
    }
}

/// `toplabel = ( *alphanum ALPHA *alphanum ) / ( 1*alphanum "-" *( alphanum / "-" ) alphanum )`
/// (§7.1): letters and digits, not all digits, inner hyphens only.
fn is_toplabel(label: &str) -> bool {
    let b = label.as_bytes();
    let (Some(first), Some(last)) = (b.first(), b.last()) else {
        return false;
    };
    b.iter().all(|c| c.is_ascii_alphanumeric() || *c == b'-')
        && first.is_ascii_alphanumeric()
        && last.is_ascii_alphanumeric()
        && (b.contains(&b'-') || b.iter().any(u8::is_ascii_alphabetic))
}

// ---------------------------------------------------------------------------------------
// Macros (§7)
// ---------------------------------------------------------------------------------------

/// A parsed macro-string (§7.1).
#[derive(Debug, Clone, PartialEq, Eq)]
struct MacroString(Vec<Token>);

#[derive(Debug, Clone, PartialEq, Eq)]
enum Token {
    /// A run of macro-literals (visible ASCII except `%`).
    Literal(String),
    /// `%%`, `%_`, `%-`: their expansions `%`, a space, `%20` (§7.1).
    Escape(&'static str),
    Macro(Macro),
}

/// `"%{" macro-letter transformers *delimiter "}"` (§7.1).
#[derive(Debug, Clone, PartialEq, Eq)]
struct Macro {
    /// Lowercase letter.
    letter: u8,
    /// An uppercase letter: URL-escape the expansion (§7.3).
    url_escape: bool,
    /// Keep this many right-hand parts.
    keep: Option<usize>,
    reverse: bool,
    /// Split on these characters; `.` when none are given.
    delimiters: Vec<u8>,
}

impl MacroString {
    /// Parses `text`; `explanation_letters` also allows c, r and t (§7.2).
    fn parse(text: &str, explanation_letters: bool) -> Result<MacroString, String> {
        let err = |what: &str| Err(format!("{what} in macro-string {text:?}"));
        let b = text.as_bytes();
        let mut tokens = Vec::new();
        let mut i = 0;
        while i < b.len() {
            match b[i] {
                b'%' => {
                    let escape = match b.get(i + 1) {
                        Some(b'%') => "%",
                        Some(b'_') => " ",
                        Some(b'-') => "%20",
                        Some(b'{') => {
                            let Some(len) = b[i + 2..].iter().position(|&c| c == b'}') else {
                                return err("unterminated macro");
                            };
                            let body = &b[i + 2..i + 2 + len];
                            let Some(m) = Macro::parse(body, explanation_letters) else {
                                return err("invalid macro");
                            };
                            tokens.push(Token::Macro(m));
                            i += len + 3;
                            continue;
                        }
                        _ => return err("'%' not followed by '{', '%', '_' or '-'"),
                    };
                    tokens.push(Token::Escape(escape));
                    i += 2;
                }
                c @ 0x21..=0x7e => {
                    if let Some(Token::Literal(s)) = tokens.last_mut() {
                        s.push(char::from(c));
                    } else {
                        tokens.push(Token::Literal(char::from(c).to_string()));
                    }
                    i += 1;
                }
                _ => return err("invalid character"),
            }
        }
        Ok(MacroString(tokens))
    }

    fn uses(&self, letter: u8) -> bool {
        self.0
            .iter()
            .any(|t| matches!(t, Token::Macro(m) if m.letter == letter))
    }

    fn expand(&self, values: &MacroValues<'_>) -> String {
        let mut out = String::new();
        for token in &self.0 {
            match token {
                Token::Literal(s) => out.push_str(s),
                Token::Escape(s) => out.push_str(s),
                Token::Macro(m) => out.push_str(&m.expand(&values.value(m.letter))),
            }
        }
        out
    }
}

impl Macro {
    /// `macro-letter transformers *delimiter`, the text between the braces.
    fn parse(body: &[u8], explanation_letters: bool) -> Option<Macro> {
        let (&letter, mut rest) = body.split_first()?;
        let lower = letter.to_ascii_lowercase();
        let allowed: &[u8] = if explanation_letters {
            b"slodiphvcrt"
        } else {
            b"slodiphv"
        };
        if !allowed.contains(&lower) {
            return None;
        }
        let digits = rest.iter().take_while(|c| c.is_ascii_digit()).count();
        let keep = if digits == 0 {
            None
        } else {
            // §7.3: the number must be nonzero; 128 parts is more than any name has.
            let n = std::str::from_utf8(&rest[..digits])
                .ok()?
                .parse::<u64>()
                .unwrap_or(u64::MAX);
            if n == 0 {
                return None;
            }
            Some(n.min(128) as usize)
        };
        rest = &rest[digits..];
        let reverse = matches!(rest.first(), Some(b'r' | b'R'));
        if reverse {
            rest = &rest[1..];
        }
        if !rest.iter().all(|c| b".-+,/_=".contains(c)) {
            return None;
        }
        Some(Macro {
            letter: lower,
            url_escape: letter.is_ascii_uppercase(),
            keep,
            reverse,
            delimiters: rest.to_vec(),
        })
    }

    /// §7.3: split on the delimiters, reverse, keep the right-hand parts, join with dots,
    /// then URL-escape for uppercase letters.
    fn expand(&self, value: &str) -> String {
        let delimiters: &[u8] = if self.delimiters.is_empty() {
            b"."
        } else {
            &self.delimiters
        };
        let mut parts: Vec<&str> = value
            .split(|c: char| c.is_ascii() && delimiters.contains(&(c as u8)))
            .collect();
        if self.reverse {
            parts.reverse();
        }
        if let Some(n) = self.keep {
            parts.drain(..parts.len().saturating_sub(n));
        }
        let joined = parts.join(".");
        if !self.url_escape {
            return joined;
        }
        let mut out = String::with_capacity(joined.len());
        for b in joined.bytes() {
            if b.is_ascii_alphanumeric() || b"-._~".contains(&b) {
                out.push(char::from(b));
            } else {
                out.push_str(&format!("%{b:02X}"));
            }
        }
        out
    }
}

/// The values macro letters expand to (§7.2).
struct MacroValues<'a> {
    local: &'a str,
    sender_domain: &'a str,
    domain: &'a str,
    ip: IpAddr,
    helo: &'a str,
    receiver: &'a str,
    /// The validated domain name of the client (`%{p}`), when the macro-string uses it.
    validated_name: Option<&'a str>,
}

impl MacroValues<'_> {
    fn value(&self, letter: u8) -> String {
        match letter {
            b's' => format!("{}@{}", self.local, self.sender_domain),
            b'l' => self.local.to_string(),
            b'o' => self.sender_domain.to_string(),
            b'd' => self.domain.to_string(),
            b'i' => match self.ip {
                IpAddr::V4(v4) => v4.to_string(),
                // §7.3: IPv6 is 32 dot-separated nibbles.
                IpAddr::V6(v6) => v6
                    .octets()
                    .iter()
                    .flat_map(|b| [b >> 4, b & 0xf])
                    .map(|n| format!("{n:x}"))
                    .collect::<Vec<_>>()
                    .join("."),
            },
            b'p' => self.validated_name.unwrap_or("unknown").to_string(),
            b'v' if self.ip.is_ipv4() => "in-addr".into(),
            b'v' => "ip6".into(),
            b'h' => self.helo.to_string(),
            b'c' => self.ip.to_string(),
            b'r' if self.receiver.is_empty() => "unknown".into(),
            b'r' => self.receiver.to_string(),
            b't' => std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map_or(0, |d| d.as_secs())
                .to_string(),
            _ => String::new(),
        }
    }
}

// ---------------------------------------------------------------------------------------
// Domain names
// ---------------------------------------------------------------------------------------

/// A name produced during evaluation, made ready for a query: one trailing dot dropped,
/// truncated from the left to 253 characters (§7.3), `None` if it still is no valid DNS
/// name (an empty label, a label over 63 octets).
fn target_name(expanded: &str) -> Option<String> {
    let mut name = expanded.strip_suffix('.').unwrap_or(expanded);
    while name.len() > 253 {
        name = name.split_once('.')?.1;
    }
    let valid = !name.is_empty() && name.split('.').all(|l| !l.is_empty() && l.len() <= 63);
    valid.then(|| name.to_string())
}

/// §4.3: the domain check_host() starts from must be a multi-label name with valid labels
/// and a real top label, or the result is `none`.
fn checkable_domain(domain: &str) -> Option<String> {
    let name = target_name(domain)?;
    let (_, top) = name.rsplit_once('.')?;
    (name.len() == domain.trim_end_matches('.').len() && is_toplabel(top)).then_some(name)
}

/// The absolute query name for `name` (labels as raw octets: SPF names may contain any
/// visible character).
fn query_name(name: &str) -> Option<Name> {
    Name::from_labels(name.split('.').map(str::as_bytes)).ok()
}

/// A name from DNS data as text, without the trailing dot.
fn name_text(name: &Name) -> String {
    name.iter()
        .map(|l| String::from_utf8_lossy(l).into_owned())
        .collect::<Vec<_>>()
        .join(".")
}

/// `name` is `parent` or a subdomain of it (ASCII case-insensitive).
fn is_within(name: &str, parent: &str) -> bool {
    let (name, parent) = (name.to_ascii_lowercase(), parent.to_ascii_lowercase());
    name == parent || name.ends_with(&format!(".{parent}"))
}

/// The reverse-lookup name of `ip` (§5.5).
fn reverse_name(ip: IpAddr) -> String {
    match ip {
        IpAddr::V4(v4) => {
            let o = v4.octets();
            format!("{}.{}.{}.{}.in-addr.arpa", o[3], o[2], o[1], o[0])
        }
        IpAddr::V6(v6) => {
            let mut s = String::new();
            for b in v6.octets().iter().rev() {
                s.push_str(&format!("{:x}.{:x}.", b & 0xf, b >> 4));
            }
            s + "ip6.arpa"
        }
    }
}

// ---------------------------------------------------------------------------------------
// Evaluation (§4, §5, §6.1)
// ---------------------------------------------------------------------------------------

type Eval<'f, T> = Pin<Box<dyn Future<Output = Result<T, Abort>> + Send + 'f>>;

struct Evaluator<'a> {
    dns: &'a DnsClient,
    stale: &'a StaleMark,
    cache: &'a SpfCache,
    /// Canonical: IPv4-mapped IPv6 addresses are IPv4 (§5).
    ip: IpAddr,
    local: &'a str,
    sender_domain: &'a str,
    helo: &'a str,
    receiver: &'a str,
    budget: Option<&'a DnsBudget>,
    dns_terms: u32,
    void_lookups: u32,
}

impl Evaluator<'_> {
    /// check_host() for `domain` (§4): recursive through include and redirect, sharing
    /// the processing limits.
    fn check(&mut self, domain: String) -> Eval<'_, AuthResult> {
        Box::pin(async move {
            let Some(domain) = checkable_domain(&domain) else {
                return Ok(AuthResult::None);
            };
            let Some(record) = self.record(&domain).await? else {
                return Ok(AuthResult::None);
            };
            for (qualifier, mechanism) in &record.directives {
                if self.matches(mechanism, &domain).await? {
                    return Ok(*qualifier);
                }
            }
            // §6.1: redirect applies when no mechanism matched; a target without a
            // record (or a malformed one) is a permerror.
            if let Some(spec) = &record.redirect {
                self.count_dns_term()?;
                let target = self.expand(spec, &domain).await?.ok_or(Abort::Perm)?;
                return match self.check(target).await? {
                    AuthResult::None => Err(Abort::Perm),
                    r => Ok(r),
                };
            }
            Ok(AuthResult::Neutral)
        })
    }

    /// §4.4 to §4.6: the parsed `v=spf1` record of `domain`, if it has one; from the
    /// cache while the TXT answer's TTL lasts.
    async fn record(&self, domain: &str) -> Result<Option<Arc<Record>>, Abort> {
        let key = domain.to_ascii_lowercase();
        let outcome = match self.cache.0.get(key.as_str()) {
            Some(outcome) => outcome,
            None => {
                // A temporary error returns here: it is never cached.
                let (rdata, valid_until) = self.query(domain, RecordType::TXT).await?;
                let outcome = find_record(rdata);
                if let Some(valid_until) = valid_until {
                    self.cache
                        .0
                        .insert(key.into_boxed_str(), outcome.clone(), valid_until);
                }
                outcome
            }
        };
        match outcome {
            CachedRecord::Found(record) => Ok(Some(record)),
            CachedRecord::Missing => Ok(None),
            CachedRecord::MoreThanOne => {
                tracing::debug!(%domain, "SPF permerror: more than one v=spf1 record");
                Err(Abort::Perm)
            }
            CachedRecord::NotUtf8 => Err(Abort::Perm),
            CachedRecord::Syntax(e) => {
                tracing::debug!(%domain, error = %e, "SPF permerror: record syntax");
                Err(Abort::Perm)
            }
        }
    }

    /// Whether `mechanism` matches (§5); errors end the whole evaluation.
    async fn matches(&mut self, mechanism: &Mechanism, domain: &str) -> Result<bool, Abort> {
        match mechanism {
            Mechanism::All => Ok(true),
            // §5.6: ip4 never matches an IPv6 client nor ip6 an IPv4 one.
            Mechanism::Ip4(net, len) => {
                Ok(Cidr { v4: *len, v6: 0 }.contains((*net).into(), self.ip))
            }
            Mechanism::Ip6(net, len) => {
                Ok(Cidr { v4: 0, v6: *len }.contains((*net).into(), self.ip))
            }
            Mechanism::Include(spec) => {
                self.count_dns_term()?;
                // §5.2: a malformed target has no record: "none", which is a permerror.
                let target = self.expand(spec, domain).await?.ok_or(Abort::Perm)?;
                match self.check(target).await? {
                    AuthResult::Pass => Ok(true),
                    AuthResult::Fail | AuthResult::SoftFail | AuthResult::Neutral => Ok(false),
                    AuthResult::TempError => Err(Abort::Temp),
                    _ => Err(Abort::Perm),
                }
            }
            Mechanism::A(spec, cidr) => {
                self.count_dns_term()?;
                let Some(target) = self.target(spec.as_ref(), domain).await? else {
                    return Ok(false);
                };
                let addrs = self.addresses(&target).await?;
                if addrs.is_empty() {
                    self.count_void()?;
                }
                Ok(addrs.iter().any(|a| cidr.contains(*a, self.ip)))
            }
            Mechanism::Mx(spec, cidr) => {
                self.count_dns_term()?;
                let Some(target) = self.target(spec.as_ref(), domain).await? else {
                    return Ok(false);
                };
                let mut exchanges: Vec<(u16, Name)> = self
                    .lookup(&target, RecordType::MX)
                    .await?
                    .into_iter()
                    .filter_map(|r| match r {
                        RData::MX(mx) => Some((mx.preference, mx.exchange)),
                        _ => None,
                    })
                    .collect();
                if exchanges.is_empty() {
                    self.count_void()?;
                    return Ok(false);
                }
                exchanges.sort_by_key(|(preference, _)| *preference);
                // RFC 7505 null MX ("." exchange) names no host.
                exchanges.retain(|(_, name)| !name.is_root());
                for (n, (_, exchange)) in exchanges.iter().enumerate() {
                    // §4.6.4: more than 10 MX names to look at is a permerror.
                    if n == MAX_NAMES_PER_TERM {
                        tracing::debug!(%target, "SPF permerror: more than 10 MX names");
                        return Err(Abort::Perm);
                    }
                    let addrs = self.addresses(&name_text(exchange)).await?;
                    if addrs.iter().any(|a| cidr.contains(*a, self.ip)) {
                        return Ok(true);
                    }
                }
                Ok(false)
            }
            Mechanism::Ptr(spec) => {
                self.count_dns_term()?;
                let Some(target) = self.target(spec.as_ref(), domain).await? else {
                    return Ok(false);
                };
                Ok(!self.validated_names(Some(&target)).await?.is_empty())
            }
            Mechanism::Exists(spec) => {
                self.count_dns_term()?;
                let Some(target) = self.expand(spec, domain).await? else {
                    return Ok(false);
                };
                // §5.7: always an A lookup, whatever the client's address family.
                let found = !self.lookup(&target, RecordType::A).await?.is_empty();
                if !found {
                    self.count_void()?;
                }
                Ok(found)
            }
        }
    }

    /// §4.6.4: one more DNS-querying term.
    fn count_dns_term(&mut self) -> Result<(), Abort> {
        self.dns_terms += 1;
        if self.dns_terms > MAX_DNS_TERMS {
            tracing::debug!("SPF permerror: more than 10 DNS-querying terms");
            return Err(Abort::Perm);
        }
        Ok(())
    }

    /// §4.6.4: one more lookup that found nothing.
    fn count_void(&mut self) -> Result<(), Abort> {
        self.void_lookups += 1;
        if self.void_lookups > MAX_VOID_LOOKUPS {
            tracing::debug!("SPF permerror: more than 2 void lookups");
            return Err(Abort::Perm);
        }
        Ok(())
    }

    /// The <target-name> of a mechanism: its expanded domain-spec or the current domain.
    async fn target(
        &mut self,
        spec: Option<&MacroString>,
        domain: &str,
    ) -> Result<Option<String>, Abort> {
        match spec {
            Some(spec) => self.expand(spec, domain).await,
            None => Ok(Some(domain.to_string())),
        }
    }

    /// Expands a domain-spec (§7) into a query name; `None` when the result is not a
    /// valid DNS name (such a target matches nothing).
    async fn expand(&mut self, spec: &MacroString, domain: &str) -> Result<Option<String>, Abort> {
        let validated = if spec.uses(b'p') {
            self.validated_names(None)
                .await?
                .into_iter()
                .min_by_key(|n| {
                    // §7.3: <domain> itself, else a subdomain of it, else any validated name.
                    if n.eq_ignore_ascii_case(domain) {
                        0
                    } else if is_within(n, domain) {
                        1
                    } else {
                        2
                    }
                })
        } else {
            None
        };
        let values = MacroValues {
            local: self.local,
            sender_domain: self.sender_domain,
            domain,
            ip: self.ip,
            helo: self.helo,
            receiver: self.receiver,
            validated_name: validated.as_deref(),
        };
        Ok(target_name(&spec.expand(&values)))
    }

    /// §5.5 "validated domain names" of the client: PTR names (the first 10) whose
    /// addresses include the client's; only those within `within` when given. A DNS error
    /// on the PTR lookup gives no names; one on an address lookup skips that name.
    async fn validated_names(&mut self, within: Option<&str>) -> Result<Vec<String>, Abort> {
        let ptrs = match self.lookup(&reverse_name(self.ip), RecordType::PTR).await {
            Ok(ptrs) => ptrs,
            Err(_) => return Ok(Vec::new()),
        };
        if ptrs.is_empty() && within.is_some() {
            self.count_void()?;
        }
        let mut validated = Vec::new();
        for rdata in ptrs.into_iter().take(MAX_NAMES_PER_TERM) {
            let RData::PTR(ptr) = rdata else { continue };
            let name = name_text(&ptr.0);
            if within.is_some_and(|t| !is_within(&name, t)) {
                continue;
            }
            if let Ok(addrs) = self.addresses(&name).await
                && addrs.contains(&self.ip)
            {
                validated.push(name);
            }
        }
        Ok(validated)
    }

    /// The A (IPv4 client) or AAAA (IPv6 client) addresses of `name` (§5.3).
    async fn addresses(&self, name: &str) -> Result<Vec<IpAddr>, Abort> {
        let rtype = if self.ip.is_ipv4() {
            RecordType::A
        } else {
            RecordType::AAAA
        };
        Ok(self
            .lookup(name, rtype)
            .await?
            .into_iter()
            .filter_map(|r| match r {
                RData::A(a) => Some(IpAddr::V4(a.0)),
                RData::AAAA(aaaa) => Some(IpAddr::V6(aaaa.0)),
                _ => None,
            })
            .collect())
    }

    /// One DNS query for the absolute name `name`: the answers of type `rtype` (none for
    /// NXDOMAIN or an empty answer), `temperror` for any other failure (§5, §2.6.6).
    async fn lookup(&self, name: &str, rtype: RecordType) -> Result<Vec<RData>, Abort> {
        Ok(self.query(name, rtype).await?.0)
    }

    /// [`Self::lookup`], with how long the answer may be cached: the answer's TTL; for "no
    /// records", the SOA's negative TTL capped at [`NEGATIVE_TTL_MAX`]. `None`: not
    /// cacheable (no query was made, or a negative answer without an SOA).
    async fn query(
        &self,
        name: &str,
        rtype: RecordType,
    ) -> Result<(Vec<RData>, Option<Instant>), Abort> {
        let Some(qname) = target_name(name).as_deref().and_then(query_name) else {
            return Ok((Vec::new(), None));
        };
        if let Some(budget) = self.budget
            && !budget.take()
        {
            tracing::debug!(%name, "SPF permerror: DNS lookup limit per message reached");
            return Err(Abort::Perm);
        }
        match self.dns.lookup(qname, rtype).await {
            Ok(answer) => {
                self.stale.note(answer.stale_age);
                Ok((answer.records.to_vec(), answer.valid_until))
            }
            Err(e) => {
                tracing::debug!(%name, %rtype, error = %e, "SPF DNS lookup failed");
                Err(Abort::Temp)
            }
        }
    }
}

/// §4.4 to §4.6: the one `v=spf1` record among the TXT answers of a domain, parsed.
fn find_record(answers: Vec<RData>) -> CachedRecord {
    let mut found = Vec::new();
    for rdata in answers {
        if let RData::TXT(txt) = rdata {
            // §3.3: the character-strings are concatenated without separator.
            let text: Vec<u8> = txt.txt_data.iter().flatten().copied().collect();
            if is_spf1(&text) {
                found.push(text);
            }
        }
    }
    match found.len() {
        0 => CachedRecord::Missing,
        1 => match String::from_utf8(found.remove(0)) {
            Ok(text) => match parse_record(&text) {
                Ok(record) => CachedRecord::Found(Arc::new(record)),
                Err(e) => CachedRecord::Syntax(e.into()),
            },
            Err(_) => CachedRecord::NotUtf8,
        },
        _ => CachedRecord::MoreThanOne,
    }
}

/// Fuzzing entry point (`crate::fuzzing::spf_record`): parses `text` as a record and, if
/// it is one, expands each mechanism's domain-spec and the `redirect=` target (not `exp=`,
/// which is never fetched) with fixed macro values for an IPv4 and an IPv6 client, as
/// `Evaluator::query` would. Each is the query name, or `None` if it matches nothing.
#[doc(hidden)]
pub fn fuzz_parse_record(text: &str) -> Result<Vec<Option<String>>, String> {
    let record = parse_record(text)?;
    let _ = checkable_domain(text);
    let clients = [
        IpAddr::V4(Ipv4Addr::new(192, 0, 2, 1)),
        IpAddr::V6(Ipv6Addr::new(0x2001, 0xdb8, 0, 0, 0, 0, 0, 1)),
    ];
    let mut names = Vec::new();
    for ip in clients {
        let values = MacroValues {
            local: "user",
            sender_domain: "example.org",
            domain: "example.org",
            ip,
            helo: "mx.example.org",
            receiver: "",
            validated_name: Some("mail.example.org"),
        };
        for (_, mechanism) in &record.directives {
            let spec = match mechanism {
                Mechanism::Include(s) | Mechanism::Exists(s) => Some(s),
                Mechanism::A(s, cidr) | Mechanism::Mx(s, cidr) => {
                    let _ = cidr.contains(ip, ip);
                    s.as_ref()
                }
                Mechanism::Ptr(s) => s.as_ref(),
                Mechanism::Ip4(net, len) => {
                    let _ = Cidr { v4: *len, v6: 128 }.contains(IpAddr::V4(*net), ip);
                    None
                }
                Mechanism::Ip6(net, len) => {
                    let _ = Cidr { v4: 32, v6: *len }.contains(IpAddr::V6(*net), ip);
                    None
                }
                Mechanism::All => None,
            };
            names.extend(spec.map(|s| target_name(&s.expand(&values))));
        }
        names.extend(
            record
                .redirect
                .iter()
                .map(|s| target_name(&s.expand(&values))),
        );
    }
    Ok(names
        .into_iter()
        .map(|n| n.filter(|n| query_name(n).is_some()))
        .collect())
}

/// The tests' authoritative DNS server, for the cache tests.
#[cfg(test)]
#[path = "../../tests/common/dns.rs"]
pub(crate) mod test_dns;

#[cfg(test)]
mod cache_tests {
    use super::test_dns::{DnsServer, Zone};
    use super::*;
    use crate::config::DnsConfig;

    /// A resolver without hickory's cache: every record lookup that the SPF cache does
    /// not answer reaches the server.
    fn uncached_resolver(dns: &DnsServer) -> DnsClient {
        DnsClient::new(&client_config(dns)).unwrap()
    }

    fn client_config(dns: &DnsServer) -> DnsConfig {
        DnsConfig {
            nameservers: vec![dns.addr()],
            timeout_ms: 300,
            attempts: 1,
            cache_entries: 0,
            server_backoff_max: Duration::from_millis(200),
            ..DnsConfig::default()
        }
    }

    async fn check(resolver: &DnsClient, cache: &SpfCache, domain: &str) -> AuthResult {
        let sender = format!("alice@{domain}");
        let req = SpfRequest {
            ip: "192.0.2.1".parse().unwrap(),
            domain,
            sender: &sender,
            helo: "mx.example.org",
            receiver: "mx.example.net",
            budget: None,
        };
        check_host(resolver, cache, &req).await
    }

    /// The message's DNS lookup count: every query takes one; one past the limit ends
    /// the evaluation in permerror without being asked; a cached record costs nothing.
    #[tokio::test]
    async fn lookups_count_against_the_message_budget() {
        let dns = DnsServer::start(
            Zone::new()
                .txt("outer.example", "v=spf1 include:inner.example -all")
                .txt("inner.example", "v=spf1 a:host.inner.example -all")
                .a("host.inner.example", "192.0.2.1"),
        );
        // A generous timeout: this test counts lookups, and a loaded machine (CI, two
        // cores) must not turn a slow answer into a temperror.
        let resolver = DnsClient::new(&DnsConfig {
            timeout_ms: 5000,
            ..client_config(&dns)
        })
        .unwrap();
        async fn run(resolver: &DnsClient, cache: &SpfCache, budget: &DnsBudget) -> AuthResult {
            let req = SpfRequest {
                ip: "192.0.2.1".parse().unwrap(),
                domain: "outer.example",
                sender: "alice@outer.example",
                helo: "mx.example.org",
                receiver: "mx.example.net",
                budget: Some(budget),
            };
            check_host(resolver, cache, &req).await
        }
        let enough = DnsBudget::new(3);
        assert_eq!(
            run(&resolver, &SpfCache::new(0), &enough).await,
            AuthResult::Pass
        );
        assert_eq!((enough.used(), enough.refused()), (3, 0));
        let short = DnsBudget::new(2);
        let before = dns.queries_for("host.inner.example");
        assert_eq!(
            run(&resolver, &SpfCache::new(0), &short).await,
            AuthResult::PermError
        );
        assert_eq!((short.used(), short.refused()), (2, 1));
        assert_eq!(
            dns.queries_for("host.inner.example"),
            before,
            "asked past the limit"
        );
        // Both TXT records cached: only the A lookup is left to count. Room for 8 per
        // shard: with 10 entries over 8 shards, two names could share a one-entry shard
        // and evict each other (a failure in 1 run of 15, by the hasher's seed).
        let cache = SpfCache::new(64);
        assert_eq!(
            run(&resolver, &cache, &DnsBudget::new(3)).await,
            AuthResult::Pass
        );
        let one = DnsBudget::new(1);
        assert_eq!(run(&resolver, &cache, &one).await, AuthResult::Pass);
        assert_eq!(one.used(), 1);
    }

    #[tokio::test]
    async fn records_and_their_absence_are_cached_errors_are_not() {
        let zone = |pass_record: &str| {
            Zone::new()
                .txt("pass.example", pass_record)
                .txt("bad.example", "v=spf1 moo")
                .txt("other.example", "not spf")
        };
        let first = "v=spf1 ip4:192.0.2.0/24 -all";
        let dns = DnsServer::start(zone(first).servfail("broken.example"));
        let resolver = uncached_resolver(&dns);
        let cache = SpfCache::new(100);

        // A record: one query, then from the cache (any case of the name), while the
        // TTL lasts even if the zone changes.
        assert_eq!(
            check(&resolver, &cache, "pass.example").await,
            AuthResult::Pass
        );
        assert_eq!(dns.queries_for("pass.example"), 1);
        assert_eq!(
            check(&resolver, &cache, "PASS.Example").await,
            AuthResult::Pass
        );
        assert_eq!(dns.queries_for("pass.example"), 1);
        dns.update_zone(|z| {
            *z = zone("v=spf1 -all").servfail("broken.example");
        });
        assert_eq!(
            check(&resolver, &cache, "pass.example").await,
            AuthResult::Pass
        );
        // Without the cache, the new record (and nothing cached by hickory).
        let fresh = SpfCache::new(100);
        assert_eq!(
            check(&resolver, &fresh, "pass.example").await,
            AuthResult::Fail
        );
        assert_eq!(dns.queries_for("pass.example"), 2);

        // NXDOMAIN, TXT without SPF, a syntax error: cached too.
        for (domain, result) in [
            ("nx.example", AuthResult::None),
            ("other.example", AuthResult::None),
            ("bad.example", AuthResult::PermError),
        ] {
            for _ in 0..2 {
                assert_eq!(check(&resolver, &cache, domain).await, result, "{domain}");
                assert_eq!(dns.queries_for(domain), 1, "{domain}");
            }
        }
        assert_eq!(cache.len(), 4);

        // SERVFAIL: temperror, never cached: the repaired zone is seen at once.
        assert_eq!(
            check(&resolver, &cache, "broken.example").await,
            AuthResult::TempError
        );
        let queried = dns.queries_for("broken.example");
        assert!(queried > 0);
        assert_eq!(
            check(&resolver, &cache, "broken.example").await,
            AuthResult::TempError
        );
        assert!(dns.queries_for("broken.example") > queried);
        dns.set_zone(zone(first).txt("broken.example", "v=spf1 +all"));
        assert_eq!(
            check(&resolver, &cache, "broken.example").await,
            AuthResult::Pass
        );
        assert_eq!(cache.len(), 5);

        // A timeout: never cached either (serve-stale off here; with it, the last
        // answer stands in, marked stale: `stale_answers_only_when_no_server_answers`).
        let no_stale = DnsClient::new(&DnsConfig {
            stale_max: Duration::ZERO,
            ..client_config(&dns)
        })
        .unwrap();
        assert_eq!(
            check(&no_stale, &fresh, "other.example").await,
            AuthResult::None
        );
        dns.set_blackhole(true);
        assert_eq!(
            check(&no_stale, &SpfCache::new(0), "other.example").await,
            AuthResult::TempError
        );
        dns.set_blackhole(false);
        let after = DnsClient::new(&client_config(&dns)).unwrap();
        assert_eq!(
            check(&after, &fresh, "other.example").await,
            AuthResult::None
        );
    }

    /// Serve-stale through SPF: an answer the server gave stands in, marked with its
    /// age, only while no server answers; an answer (NXDOMAIN included) wins at once.
    #[tokio::test]
    async fn stale_answers_only_when_no_server_answers() {
        let dns = DnsServer::start(
            Zone::new()
                .txt("known.example", "v=spf1 ip4:192.0.2.0/24 -all")
                .txt("gone.example", "v=spf1 ip4:192.0.2.0/24 -all"),
        );
        dns.set_ttl(1);
        let client = DnsClient::new(&client_config(&dns)).unwrap();
        let run = |domain: &'static str| {
            let client = client.clone();
            async move {
                let sender = format!("alice@{domain}");
                let req = SpfRequest {
                    ip: "192.0.2.1".parse().unwrap(),
                    domain,
                    sender: &sender,
                    helo: "mx.example.org",
                    receiver: "mx.example.net",
                    budget: None,
                };
                let mark = StaleMark::default();
                // No parsed cache: every check reaches the DNS layer.
                let r = check_host_marked(&client, &SpfCache::new(0), &req, &mark).await;
                (r, mark.age_secs())
            }
        };
        assert_eq!(run("known.example").await, (AuthResult::Pass, None));
        assert_eq!(run("gone.example").await, (AuthResult::Pass, None));
        // The record is removed: NXDOMAIN/NODATA is an answer, it wins at once.
        dns.update_zone(|z| *z = Zone::new().txt("known.example", "v=spf1 ip4:192.0.2.0/24 -all"));
        assert_eq!(run("gone.example").await, (AuthResult::None, None));
        // The TTL (1 s in the test zone) runs out, then the server stops answering.
        tokio::time::sleep(Duration::from_millis(1100)).await;
        dns.set_blackhole(true);
        let (result, age) = run("known.example").await;
        assert_eq!(result, AuthResult::Pass, "the known record stands in");
        assert!(age.is_some(), "marked stale");
        // The removal is remembered too (a negative answer is served stale as such).
        assert_eq!(run("gone.example").await.0, AuthResult::None);
        // Never seen: nothing to stand in.
        assert_eq!(run("never.example").await, (AuthResult::TempError, None));
        // The server answers again: the next check is fresh.
        dns.set_blackhole(false);
        let mut fresh = false;
        for _ in 0..50 {
            if run("known.example").await == (AuthResult::Pass, None) {
                fresh = true;
                break;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        assert!(fresh, "a recovered server is used again within 5 s");
    }

    #[test]
    fn capacity_zero_caches_nothing() {
        let cache = SpfCache::new(0);
        assert!(cache.is_empty());
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    use AuthResult::{Fail, Neutral, Pass, SoftFail};

    fn spec(text: &str) -> MacroString {
        parse_domain_spec(text).unwrap_or_else(|e| panic!("{text}: {e}"))
    }

    fn cidr(v4: u8, v6: u8) -> Cidr {
        Cidr { v4, v6 }
    }

    #[test]
    fn record_selection() {
        assert!(is_spf1(b"v=spf1"));
        assert!(is_spf1(b"V=SpF1 -all"));
        assert!(!is_spf1(b"v=spf10"));
        assert!(!is_spf1(b"v=spf1mx"));
        assert!(!is_spf1(b"v=spf"));
    }

    #[test]
    fn parses_mechanisms_and_modifiers() {
        let r = parse_record(
            "v=spf1  +a -mx:example.org/24//64 ~ptr ?ip4:192.0.2.0/24 ip6:2001:db8::/32 \
             include:_spf.example.com exists:%{ir}.bl.example.net redirect=%{d}.example. \
             exp=exp.example.com moo.cow-far_out=man:dog/cat all ",
        )
        .unwrap();
        let d = &r.directives;
        assert_eq!(d.len(), 8);
        assert_eq!(d[0], (Pass, Mechanism::A(None, Cidr::FULL)));
        assert_eq!(
            d[1],
            (Fail, Mechanism::Mx(Some(spec("example.org")), cidr(24, 64)))
        );
        assert_eq!(d[2], (SoftFail, Mechanism::Ptr(None)));
        assert_eq!(d[3], (Neutral, Mechanism::Ip4([192, 0, 2, 0].into(), 24)));
        assert_eq!(d[4].1, Mechanism::Ip6("2001:db8::".parse().unwrap(), 32));
        assert_eq!(d[7], (Pass, Mechanism::All));
        assert!(r.redirect.is_some() && r.exp.is_some());
        assert_eq!(parse_record("v=spf1").unwrap(), Record::default());
    }

    #[test]
    fn dual_cidr_lengths() {
        assert_eq!(split_dual_cidr(""), Ok(("", Cidr::FULL)));
        assert_eq!(split_dual_cidr("/0"), Ok(("", cidr(0, 128))));
        assert_eq!(split_dual_cidr("//0"), Ok(("", cidr(32, 0))));
        let spec_and_cidr = split_dual_cidr(":a.example/24//64");
        assert_eq!(spec_and_cidr, Ok((":a.example", cidr(24, 64))));
        let slash_in_spec = split_dual_cidr(":foo:bar/baz.example");
        assert_eq!(slash_in_spec, Ok((":foo:bar/baz.example", Cidr::FULL)));
        for bad in ["/33", "//129", "/032", "/24/64"] {
            assert!(split_dual_cidr(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn rejects_bad_records() {
        for bad in [
            "v=spf1 ip4:1.2.3.4 -all moo",
            "v=spf1 moo.cow/far_out=man:dog/cat",
            "v=spf1 moo.cow:far_out=man:dog/cat",
            "v=spf1 redirect:t2.example.com",
            "v=spf1 -all.",
            "v=spf1 -all:foobar",
            "v=spf1 -all/8",
            "v=spf1 ptr/0",
            "v=spf1 ptr:",
            "v=spf1 a:",
            "v=spf1 a/33",
            "v=spf1 a//129",
            "v=spf1 a/24/64",
            "v=spf1 a:foo-bar",
            "v=spf1 a:museum",
            "v=spf1 a:museum.",
            "v=spf1 a:111.222.33.44",
            "v=spf1 a:abc.123",
            "v=spf1 a:example.-com",
            "v=spf1 a:example.com:8080",
            "v=spf1 a:foo.example.com\0",
            "v=spf1 a:ctrl.example.com\rptr -all",
            "v=spf1 \u{80}a:example.net -all",
            "v=spf1 include",
            "v=spf1 include:ip5.example.com/24",
            "v=spf1 exists",
            "v=spf1 exists:mail.example.com/24",
            "v=spf1 ip4",
            "v=spf1 ip4:1.2.3",
            "v=spf1 ip4:1.2.3.4:8080",
            "v=spf1 ip4:1.2.3.4/33",
            "v=spf1 ip4:1.2.3.4/032",
            "v=spf1 ip4:1.2.3.4//32",
            "v=spf1 ip4:01.2.3.4",
            "v=spf1 ip4:192.0.2.5\n include:spf.example.com",
            "v=spf1 ip6:::1.1.1.1/129",
            "v=spf1 ip6:::1.1.1.1//33",
            "v=spf1 ip6::CAFE::BABE",
            "v=spf1 1up=foo",
            "v=spf1 =all",
            "v=spf1 foo=%abc",
            "v=spf1 exp=",
            "v=spf1 exp=-all",
            "v=spf1 redirect=",
            "v=spf1 redirect=-all ?all",
            "v=spf1 exp=a.example.com exp=b.example.com",
            "v=spf1 redirect=a.example.com redirect=a.example.com",
            "v=spf1 exp=%{r}.example.com",
            "v=spf1 a:%{a}.example.com",
            "v=spf1 exists:%(ir).sbl.example.com",
            "v=spf1 exists:foo%.sbl.example.com",
            "v=spf1 exists:%{d0}.example.com",
            "v=spf1 -",
            "v=spf1 -foo=bar",
        ] {
            assert!(parse_record(bad).is_err(), "accepted {bad:?}");
        }
    }

    #[test]
    fn accepts_edge_syntax() {
        for good in [
            "v=spf1 a:foo:bar/baz.example.com",
            "v=spf1 a:foo.example.xn--zckzah -all",
            "v=spf1 a:mail.example...com",
            "v=spf1 a:%{H}.bar",
            "v=spf1 a:macro%%percent%_%_space%-url-space.example.com",
            "v=spf1 default=+ x.y=%{c}%{r}%{t}",
            "V=SPF1 ALL",
            "v=spf1 exists:%{l2r+-}.user.%{d2}",
            "v=spf1 include:o.spf.example.com.",
        ] {
            let parsed = parse_record(good);
            assert!(parsed.is_ok(), "rejected {good:?}: {parsed:?}");
        }
    }

    fn values(ip: &str) -> MacroValues<'static> {
        MacroValues {
            local: "strong-bad",
            sender_domain: "email.example.com",
            domain: "email.example.com",
            ip: ip.parse().unwrap(),
            helo: "mx.example.org",
            receiver: "mx.example.net",
            validated_name: Some("mx.example.org"),
        }
    }

    /// RFC 7208 §7.4.
    #[test]
    fn macro_examples_of_section_7_4() {
        let v4 = values("192.0.2.3");
        for (macro_string, expansion) in [
            ("%{s}", "strong-bad@email.example.com"),
            ("%{o}", "email.example.com"),
            ("%{d}", "email.example.com"),
            ("%{d4}", "email.example.com"),
            ("%{d3}", "email.example.com"),
            ("%{d2}", "example.com"),
            ("%{d1}", "com"),
            ("%{dr}", "com.example.email"),
            ("%{d2r}", "example.email"),
            ("%{l}", "strong-bad"),
            ("%{l-}", "strong.bad"),
            ("%{lr}", "strong-bad"),
            ("%{lr-}", "bad.strong"),
            ("%{l1r-}", "strong"),
            (
                "%{ir}.%{v}._spf.%{d2}",
                "3.2.0.192.in-addr._spf.example.com",
            ),
            ("%{lr-}.lp._spf.%{d2}", "bad.strong.lp._spf.example.com"),
            (
                "%{lr-}.lp.%{ir}.%{v}._spf.%{d2}",
                "bad.strong.lp.3.2.0.192.in-addr._spf.example.com",
            ),
            (
                "%{ir}.%{v}.%{l1r-}.lp._spf.%{d2}",
                "3.2.0.192.in-addr.strong.lp._spf.example.com",
            ),
            (
                "%{d2}.trusted-domains.example.net",
                "example.com.trusted-domains.example.net",
            ),
        ] {
            assert_eq!(spec(macro_string).expand(&v4), expansion, "{macro_string}");
        }
        let v6 = values("2001:db8::cb01");
        assert_eq!(
            spec("%{ir}.%{v}._spf.%{d2}").expand(&v6),
            "1.0.b.c.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.8.b.d.0.1.0.0.2.ip6._spf.example.com"
        );
    }

    #[test]
    fn macro_escapes_and_url_encoding() {
        let v = MacroValues {
            local: "~jack&jill=up-a_b3.c",
            ..values("192.0.2.3")
        };
        assert_eq!(
            MacroString::parse("%{L}", true).unwrap().expand(&v),
            "~jack%26jill%3Dup-a_b3.c"
        );
        assert_eq!(
            spec("macro%%percent%_%_space%-url-space.example.com").expand(&v),
            "macro%percent  space%20url-space.example.com"
        );
        assert_eq!(
            spec("%{p}.example.com").expand(&v),
            "mx.example.org.example.com"
        );
        assert!(
            MacroString::parse("%{c} %{r}", true).is_err(),
            "a space is no literal"
        );
        assert_eq!(
            MacroString::parse("%{c}.%{r}.%{v}", true)
                .unwrap()
                .expand(&values("2001:db8::1")),
            "2001:db8::1.mx.example.net.ip6"
        );
    }

    #[test]
    fn target_names() {
        assert_eq!(target_name("example.com."), Some("example.com".into()));
        assert_eq!(target_name("mail.example...com"), None);
        assert_eq!(
            target_name(&format!("{}.example.com", "a".repeat(64))),
            None
        );
        let long = format!("{}.example.com", ["label"; 60].join("."));
        let t = target_name(&long).unwrap();
        assert!(t.len() <= 253 && t.ends_with(".example.com") && t.starts_with("label."));
        assert_eq!(checkable_domain("A...example.com"), None);
        assert_eq!(checkable_domain("[1.2.3.5]"), None);
        assert_eq!(checkable_domain("A2345678"), None);
        assert_eq!(checkable_domain("example.com."), Some("example.com".into()));
    }

    #[test]
    fn prefixes_and_reverse_names() {
        let ip = |s: &str| s.parse::<IpAddr>().unwrap();
        assert!(cidr(0, 128).contains(ip("1.1.1.1"), ip("1.2.3.4")));
        assert!(cidr(24, 128).contains(ip("1.2.3.5"), ip("1.2.3.4")));
        assert!(!cidr(32, 0).contains(ip("1.2.3.5"), ip("1.2.3.4")));
        assert!(!cidr(0, 0).contains(ip("::1.1.1.1"), ip("1.2.3.4")));
        assert!(!cidr(32, 33).contains(ip("cafe:babe::"), ip("cafe:babe:8000::")));
        assert!(cidr(32, 33).contains(ip("cafe:babe::"), ip("cafe:babe:7fff::")));
        assert_eq!(reverse_name(ip("1.2.3.4")), "4.3.2.1.in-addr.arpa");
        assert_eq!(
            reverse_name(ip("2001:db8::1")),
            "1.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.8.b.d.0.1.0.0.2.ip6.arpa"
        );
    }
}
