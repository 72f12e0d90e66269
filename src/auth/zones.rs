//! Local zone files (`[dns] zone_files`): DNS answers read from RFC 1035 master files,
//! given before the resolver is asked.
//!
//! What they are for: a first run that shows the checks working the same on every
//! machine (the shipped `config/demo.zone`), policy tests and bug reports that replay
//! offline, and a lab in front of the real resolver.
//!
//! Semantics: each `$ORIGIN` of a file makes it authoritative for that name and
//! everything under it, as a primary server would be. A name at or under an origin is
//! answered from the files only: its records of the asked type, "no records of this
//! type" (NODATA) when it has others or names below it, "no such name" (NXDOMAIN)
//! otherwise. Any other name goes to the resolver, unless `[dns] only_zone_files` is set,
//! in which case it is NXDOMAIN (nothing leaves the machine). The answers carry the
//! records' TTLs, so the verification caches treat them as any other answer.
//!
//! The master-file subset read (RFC 1035 §5.1): `$ORIGIN`, `$TTL`, comments (`;`),
//! parentheses across lines, `@`, relative and absolute owner names, an omitted owner
//! (the previous one), TTL and class (`IN`) in either order, and the types A, AAAA, MX
//! and TXT, whose character-strings may be quoted (with `\"`, `\\` and `\DDD` escapes)
//! and several per record (DKIM keys longer than 255 octets). SOA and NS records are
//! accepted and ignored (pasted zones have them); any other type, `$INCLUDE` or
//! `$GENERATE`, or a wildcard owner, is an error naming the file and line.
//!
//! The hook: [`crate::auth::dns::DnsClient::lookup`], the one lookup path of SPF, DKIM,
//! DMARC and ARC keys, asks [`ZoneSet::answer`] first. Zone answers are never kept for
//! serve-stale (they are always there).

use std::collections::{BTreeMap, HashMap};
use std::net::{Ipv4Addr, Ipv6Addr};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use hickory_resolver::lookup::Lookup;
use hickory_resolver::net::{DnsError, NetError, NoRecords};
use hickory_resolver::proto::op::{Query, ResponseCode};
use hickory_resolver::proto::rr::rdata::{A, AAAA, MX, TXT};
use hickory_resolver::proto::rr::{Name, RData, Record, RecordType};

/// TTL of records before any `$TTL` (RFC 2308 makes `$TTL` the default; BIND uses
/// the SOA minimum, which we do not read).
pub const DEFAULT_ZONE_TTL: u32 = 3600;

/// Every record of every configured zone file.
#[derive(Debug, Default)]
pub struct ZoneSet {
    /// Owner name (lower case, absolute) → its records.
    records: HashMap<Name, Vec<Record>>,
    /// The names the files are authoritative for (their `$ORIGIN`s).
    origins: Vec<Name>,
}

/// A zone-file error: file, line, what.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[error("{file}:{line}: {reason}", file = .file.display())]
pub struct ZoneError {
    pub file: PathBuf,
    pub line: usize,
    pub reason: String,
}

impl ZoneSet {
    /// Reads every file; the first error stops.
    pub fn load(files: &[PathBuf]) -> Result<ZoneSet, ZoneError> {
        let mut set = ZoneSet::default();
        for f in files {
            let text = std::fs::read_to_string(f).map_err(|e| ZoneError {
                file: f.clone(),
                line: 0,
                reason: format!("cannot read: {e}"),
            })?;
            set.add(f, &text)?;
        }
        Ok(set)
    }

    /// Parses one file's text (`file` names it in errors).
    pub fn add(&mut self, file: &Path, text: &str) -> Result<(), ZoneError> {
        let mut p = Parser {
            origin: None,
            ttl: DEFAULT_ZONE_TTL,
            owner: None,
        };
        for (line, entry) in entries(text).map_err(|(line, reason)| ZoneError {
            file: file.to_path_buf(),
            line,
            reason,
        })? {
            let err = |reason: String| ZoneError {
                file: file.to_path_buf(),
                line,
                reason,
            };
            if let Some(record) = p.entry(&entry, &mut self.origins).map_err(err)? {
                self.records
                    .entry(record.name.to_lowercase())
                    .or_default()
                    .push(record);
            }
        }
        if p.origin.is_none() && self.origins.is_empty() {
            return Err(ZoneError {
                file: file.to_path_buf(),
                line: 1,
                reason: "no $ORIGIN: which names the file answers for must be stated".into(),
            });
        }
        Ok(())
    }

    /// How many owner names the files hold.
    pub fn names(&self) -> usize {
        self.records.len()
    }

    /// The answer for `name`/`rtype` when the files are authoritative for it.
    pub(crate) fn answer(
        &self,
        name: &Name,
        rtype: RecordType,
    ) -> Option<Result<Lookup, NetError>> {
        let mut name = name.to_lowercase();
        name.set_fqdn(true);
        if !self.origins.iter().any(|o| o.zone_of(&name)) {
            return None;
        }
        let query = Query::query(name.clone(), rtype);
        let found: Vec<Record> = self
            .records
            .get(&name)
            .map(|rs| {
                rs.iter()
                    .filter(|r| r.record_type() == rtype)
                    .cloned()
                    .collect()
            })
            .unwrap_or_default();
        if found.is_empty() {
            // NODATA when the name owns other records or names below it (an empty
            // non-terminal such as `_domainkey.example.com`), else NXDOMAIN.
            let exists =
                self.records.contains_key(&name) || self.records.keys().any(|n| name.zone_of(n));
            return Some(Err(no_records(query, exists)));
        }
        let ttl = found.iter().map(|r| r.ttl).min().unwrap_or(0);
        let valid_until = Instant::now() + Duration::from_secs(u64::from(ttl));
        Some(Ok(Lookup::new_with_deadline(query, found, valid_until)))
    }
}

fn no_records(query: Query, exists: bool) -> NetError {
    let code = if exists {
        ResponseCode::NoError
    } else {
        ResponseCode::NXDomain
    };
    NetError::Dns(DnsError::NoRecordsFound(NoRecords::new(query, code)))
}

/// One logical entry: its first line number and its tokens (parentheses joined).
type Entry = (usize, Vec<Token>);

#[derive(Debug, Clone, PartialEq, Eq)]
struct Token {
    text: Vec<u8>,
    quoted: bool,
    /// The entry's line started with blank space here: the owner is omitted.
    indented: bool,
}

/// Splits the file into entries: comments removed, quoted strings unescaped, lines
/// inside parentheses joined.
fn entries(text: &str) -> Result<Vec<Entry>, (usize, String)> {
    let mut out: Vec<Entry> = Vec::new();
    let mut depth = 0usize;
    let mut current: Vec<Token> = Vec::new();
    let mut start = 0;
    for (i, line) in text.lines().enumerate() {
        let n = i + 1;
        if depth == 0 {
            start = n;
        }
        let bytes = line.as_bytes();
        let mut pos = 0;
        // An entry whose line starts with blank space has no owner name (RFC 1035 §5.1).
        let indented = depth == 0 && bytes.first().is_some_and(|b| *b == b' ' || *b == b'\t');
        while pos < bytes.len() {
            let c = bytes[pos];
            match c {
                b' ' | b'\t' | b'\r' => pos += 1,
                b';' => break,
                b'(' => {
                    depth += 1;
                    pos += 1;
                }
                b')' => {
                    depth = depth
                        .checked_sub(1)
                        .ok_or((n, "unbalanced `)`".to_string()))?;
                    pos += 1;
                }
                b'"' => {
                    let (text, next) = quoted(bytes, pos + 1).map_err(|e| (n, e))?;
                    current.push(Token {
                        text,
                        quoted: true,
                        indented: false,
                    });
                    pos = next;
                }
                _ => {
                    let end = bytes[pos..]
                        .iter()
                        .position(|b| b" \t\r;()\"".contains(b))
                        .map_or(bytes.len(), |k| pos + k);
                    current.push(Token {
                        text: bytes[pos..end].to_vec(),
                        quoted: false,
                        indented: indented && current.is_empty(),
                    });
                    pos = end;
                }
            }
        }
        if depth == 0 && !current.is_empty() {
            out.push((start, std::mem::take(&mut current)));
        }
    }
    if depth > 0 {
        return Err((start, "`(` not closed".into()));
    }
    Ok(out)
}

/// A quoted character-string from `from` (just after the opening quote): its bytes and
/// the position after the closing quote.
fn quoted(bytes: &[u8], from: usize) -> Result<(Vec<u8>, usize), String> {
    let mut out = Vec::new();
    let mut pos = from;
    while pos < bytes.len() {
        match bytes[pos] {
            b'"' => return Ok((out, pos + 1)),
            b'\\' => {
                let rest = &bytes[pos + 1..];
                if rest.len() >= 3 && rest[..3].iter().all(u8::is_ascii_digit) {
                    let v: u32 = std::str::from_utf8(&rest[..3])
                        .ok()
                        .and_then(|s| s.parse().ok())
                        .unwrap_or(256);
                    out.push(u8::try_from(v).map_err(|_| "`\\DDD` above 255".to_string())?);
                    pos += 4;
                } else if let Some(&c) = rest.first() {
                    out.push(c);
                    pos += 2;
                } else {
                    break;
                }
            }
            c => {
                out.push(c);
                pos += 1;
            }
        }
    }
    Err("quoted string not closed on its line".into())
}

struct Parser {
    origin: Option<Name>,
    ttl: u32,
    owner: Option<Name>,
}

impl Parser {
    /// One entry: a directive (None) or a record (None for ignored SOA/NS).
    fn entry(
        &mut self,
        tokens: &[Token],
        origins: &mut Vec<Name>,
    ) -> Result<Option<Record>, String> {
        let word = |t: &Token| String::from_utf8_lossy(&t.text).into_owned();
        let first = word(&tokens[0]);
        if !tokens[0].quoted && first.starts_with('$') {
            let arg = tokens
                .get(1)
                .map(word)
                .ok_or(format!("{first} needs a value"))?;
            match first.to_ascii_uppercase().as_str() {
                "$ORIGIN" => {
                    let origin = self.name(&arg)?;
                    if !origins.contains(&origin) {
                        origins.push(origin.clone());
                    }
                    self.origin = Some(origin);
                }
                "$TTL" => self.ttl = ttl(&arg).ok_or(format!("$TTL {arg}: not a TTL"))?,
                other => return Err(format!("{other} is not supported (only $ORIGIN and $TTL)")),
            }
            return Ok(None);
        }
        let mut rest = tokens;
        let owner = if tokens[0].indented {
            self.owner
                .clone()
                .ok_or("a record without an owner name, and no previous one")?
        } else {
            rest = &tokens[1..];
            let owner = self.name(&first)?;
            if owner.is_wildcard() {
                return Err(format!("{first}: wildcard owners are not supported"));
            }
            owner
        };
        self.owner = Some(owner.clone());
        let mut ttl_here = None;
        while let Some(t) = rest.first() {
            let w = word(t);
            if w.eq_ignore_ascii_case("IN") {
                rest = &rest[1..];
            } else if let Some(v) = ttl(&w).filter(|_| ttl_here.is_none()) {
                ttl_here = Some(v);
                rest = &rest[1..];
            } else {
                break;
            }
        }
        let (rtype, data) = rest.split_first().ok_or("a record without a type")?;
        let rtype = word(rtype).to_ascii_uppercase();
        let rdata = match rtype.as_str() {
            "A" => RData::A(A(one(data, &rtype)?
                .parse::<Ipv4Addr>()
                .map_err(|e| format!("A: {e}"))?)),
            "AAAA" => RData::AAAA(AAAA(
                one(data, &rtype)?
                    .parse::<Ipv6Addr>()
                    .map_err(|e| format!("AAAA: {e}"))?,
            )),
            "MX" => {
                let [pref, host] = data else {
                    return Err("MX needs a preference and a host".into());
                };
                let pref = word(pref)
                    .parse::<u16>()
                    .map_err(|e| format!("MX preference: {e}"))?;
                RData::MX(MX::new(pref, self.name(&word(host))?))
            }
            "TXT" => {
                if data.is_empty() {
                    return Err("TXT needs at least one string".into());
                }
                if let Some(long) = data.iter().find(|t| t.text.len() > 255) {
                    return Err(format!(
                        "TXT: a string of {} octets (at most 255 each: split it into several quoted strings)",
                        long.text.len()
                    ));
                }
                RData::TXT(TXT::from_bytes(
                    data.iter().map(|t| t.text.as_slice()).collect(),
                ))
            }
            "SOA" | "NS" => return Ok(None),
            other => {
                return Err(format!(
                    "record type {other} is not supported (A, AAAA, MX, TXT; SOA and NS are ignored)"
                ));
            }
        };
        Ok(Some(Record::from_rdata(
            owner,
            ttl_here.unwrap_or(self.ttl),
            rdata,
        )))
    }

    /// `@`, an absolute name, or a name relative to the current `$ORIGIN`.
    fn name(&self, text: &str) -> Result<Name, String> {
        let origin = self.origin.as_ref();
        let name = if text == "@" {
            origin.cloned().ok_or("`@` before any $ORIGIN")?
        } else if text.ends_with('.') {
            Name::from_ascii(text).map_err(|e| format!("{text}: {e}"))?
        } else {
            let origin = origin.ok_or(format!("{text}: a relative name before any $ORIGIN"))?;
            Name::from_ascii(text)
                .and_then(|n| n.append_domain(origin))
                .map_err(|e| format!("{text}: {e}"))?
        };
        let mut name = name.to_lowercase();
        name.set_fqdn(true);
        Ok(name)
    }
}

/// A TTL: seconds, or BIND-style units (`1h`, `2d`, `1w`).
fn ttl(text: &str) -> Option<u32> {
    if text.is_empty() || !text.as_bytes()[0].is_ascii_digit() {
        return None;
    }
    let (num, unit) = text.split_at(
        text.find(|c: char| !c.is_ascii_digit())
            .unwrap_or(text.len()),
    );
    let n: u32 = num.parse().ok()?;
    let mult = match unit.to_ascii_lowercase().as_str() {
        "" | "s" => 1,
        "m" => 60,
        "h" => 3600,
        "d" => 86_400,
        "w" => 604_800,
        _ => return None,
    };
    n.checked_mul(mult)
}

fn one(data: &[Token], rtype: &str) -> Result<String, String> {
    match data {
        [t] => Ok(String::from_utf8_lossy(&t.text).into_owned()),
        _ => Err(format!("{rtype} needs exactly one value")),
    }
}

/// The owner names and types of a set, sorted (for `check --json`-like listings and
/// tests).
pub fn listing(set: &ZoneSet) -> BTreeMap<String, Vec<String>> {
    set.records
        .iter()
        .map(|(n, rs)| {
            (
                n.to_string(),
                rs.iter().map(|r| r.record_type().to_string()).collect(),
            )
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    const ZONE: &str = r#"
$ORIGIN example.com.
$TTL 300
@           IN  TXT  "v=spf1 ip4:192.0.2.0/24 -all"
            IN  MX   10 mail
mail    60  IN  A    192.0.2.25
mail        IN  AAAA 2001:db8::25
_dmarc      IN  TXT  "v=DMARC1; p=reject"
sel._domainkey IN TXT ( "v=DKIM1; k=rsa; "   ; split key
                        "p=AAAA" "BBBB" )
q           TXT  "say \"hi\"\059 \\ done"
other.net.  IN  A    198.51.100.1
"#;

    fn set() -> ZoneSet {
        let mut s = ZoneSet::default();
        s.add(Path::new("demo.zone"), ZONE).unwrap();
        s
    }

    fn texts(l: &Lookup) -> Vec<Vec<u8>> {
        l.answers()
            .iter()
            .filter_map(|r| match &r.data {
                RData::TXT(t) => Some(t.txt_data.iter().flatten().copied().collect()),
                _ => None,
            })
            .collect()
    }

    fn ask(s: &ZoneSet, name: &str, t: RecordType) -> Option<Result<Lookup, NetError>> {
        s.answer(&Name::from_ascii(name).unwrap(), t)
    }

    #[test]
    fn records_of_the_asked_type_with_their_ttl() {
        let s = set();
        let spf = ask(&s, "example.com.", RecordType::TXT).unwrap().unwrap();
        assert_eq!(texts(&spf), [b"v=spf1 ip4:192.0.2.0/24 -all".to_vec()]);
        assert_eq!(spf.answers()[0].ttl, 300);
        let mx = ask(&s, "EXAMPLE.com", RecordType::MX).unwrap().unwrap();
        match &mx.answers()[0].data {
            RData::MX(m) => {
                assert_eq!(m.preference, 10);
                assert_eq!(m.exchange.to_string(), "mail.example.com.");
            }
            other => panic!("{other:?}"),
        }
        let a = ask(&s, "mail.example.com.", RecordType::A)
            .unwrap()
            .unwrap();
        assert_eq!(a.answers()[0].ttl, 60);
        assert!(
            ask(&s, "mail.example.com.", RecordType::AAAA)
                .unwrap()
                .is_ok()
        );
    }

    #[test]
    fn multi_string_txt_and_escapes() {
        let s = set();
        let key = ask(&s, "sel._domainkey.example.com.", RecordType::TXT)
            .unwrap()
            .unwrap();
        assert_eq!(texts(&key), [b"v=DKIM1; k=rsa; p=AAAABBBB".to_vec()]);
        match &key.answers()[0].data {
            RData::TXT(t) => assert_eq!(t.txt_data.len(), 3),
            other => panic!("{other:?}"),
        }
        let q = ask(&s, "q.example.com.", RecordType::TXT).unwrap().unwrap();
        assert_eq!(texts(&q), [b"say \"hi\"; \\ done".to_vec()]);
    }

    #[test]
    fn authoritative_below_the_origin_only() {
        let s = set();
        let code = |name: &str, t| match ask(&s, name, t) {
            Some(Err(NetError::Dns(DnsError::NoRecordsFound(n)))) => Some(n.response_code),
            Some(other) => panic!("{name}: {other:?}"),
            None => None,
        };
        // Owns other types; an empty non-terminal; a name that does not exist.
        assert_eq!(
            code("mail.example.com.", RecordType::TXT),
            Some(ResponseCode::NoError)
        );
        assert_eq!(
            code("_domainkey.example.com.", RecordType::TXT),
            Some(ResponseCode::NoError)
        );
        assert_eq!(
            code("nope.example.com.", RecordType::A),
            Some(ResponseCode::NXDomain)
        );
        // Outside every origin (even a name the file holds): the resolver's.
        assert_eq!(code("example.org.", RecordType::TXT), None);
        assert_eq!(code("other.net.", RecordType::A), None);
        assert_eq!(code("notexample.com.", RecordType::A), None);
    }

    #[test]
    fn errors_name_the_line() {
        let cases = [
            (
                "$ORIGIN a.test.\nx IN CNAME y\n",
                2,
                "CNAME is not supported",
            ),
            (
                "$ORIGIN a.test.\n$INCLUDE other\n",
                2,
                "$INCLUDE is not supported",
            ),
            ("x IN A 192.0.2.1\n", 1, "before any $ORIGIN"),
            ("$ORIGIN a.test.\n\nx IN A 300.0.0.1\n", 3, "A:"),
            ("$ORIGIN a.test.\nx IN TXT \"open\n", 2, "not closed"),
            ("$ORIGIN a.test.\nx IN TXT ( \"a\"\n", 2, "not closed"),
            ("$ORIGIN a.test.\n*.x IN A 192.0.2.1\n", 2, "wildcard"),
            ("; nothing\n", 1, "no $ORIGIN"),
        ];
        for (text, line, what) in cases {
            let e = ZoneSet::default()
                .add(Path::new("z.zone"), text)
                .expect_err(text);
            assert_eq!(e.line, line, "{text:?}: {e}");
            assert!(
                e.to_string().starts_with(&format!("z.zone:{line}: ")),
                "{e}"
            );
            assert!(e.reason.contains(what), "{text:?}: {e}");
        }
        let long = format!("$ORIGIN a.test.\nx IN TXT \"{}\"\n", "k".repeat(256));
        let e = ZoneSet::default().add(Path::new("z"), &long).unwrap_err();
        assert!(e.reason.contains("at most 255"), "{e}");
    }

    #[tokio::test]
    async fn the_dns_client_answers_from_the_zones_first_and_only_when_asked() {
        use crate::auth::dns::DnsClient;
        use std::sync::Arc;
        let name = |n: &str| Name::from_ascii(n).unwrap();
        // An upstream that can never answer: a dead loopback port, one short try.
        let dead = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
        let cfg = crate::config::DnsConfig {
            nameservers: vec![dead.local_addr().unwrap()],
            timeout_ms: 200,
            attempts: 1,
            stale_max: std::time::Duration::ZERO,
            ..Default::default()
        };
        let zones = Some(Arc::new(set()));
        let local_first = DnsClient::new(&cfg)
            .unwrap()
            .with_zones(zones.clone(), false);
        let a = local_first
            .lookup(name("mail.example.com."), RecordType::A)
            .await
            .unwrap();
        assert_eq!(a.records.len(), 1);
        // Outside the zones: the upstream is asked (and here fails: no answer at all).
        assert!(
            local_first
                .lookup(name("example.org."), RecordType::TXT)
                .await
                .is_err()
        );
        // With only_zone_files the system configuration is not even read.
        let none = crate::config::DnsConfig {
            only_zone_files: true,
            zone_files: vec!["demo.zone".into()],
            ..Default::default()
        };
        assert!(none.nameservers.is_empty());
        let offline = DnsClient::new(&none)
            .unwrap()
            .with_zones(zones.clone(), true);
        assert_eq!(
            offline
                .lookup(name("mail.example.com."), RecordType::A)
                .await
                .unwrap()
                .records
                .len(),
            1
        );
        // Every other name: no such name, from no server.
        let other = offline
            .lookup(name("example.org."), RecordType::TXT)
            .await
            .unwrap();
        assert!(other.records.is_empty());
    }
}
