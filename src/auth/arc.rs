//! ARC (RFC 8617): the chain's validity from mail-auth, and what the most recent set
//! recorded, read by us.
//!
//! mail-auth's `verify_arc` validates the chain as RFC 8617 §5.2 says: instances 1..N
//! without gaps, `cv=none` on i=1 and `cv=pass` on every later seal, the most recent
//! ARC-Message-Signature over the message as it is, and every ARC-Seal. On top of that we
//! keep what a DMARC override needs (RFC 8617 §7.2): who sealed the **most recent** set
//! (its ARC-Seal `d=`) and the results its ARC-Authentication-Results recorded, parsed
//! with RFC 8601 syntax (comments, quoted strings, `ptype.property=value`).
//!
//! Only the most recent set counts: anyone can add a valid set on top of a chain (with
//! `cv=pass`, sealing the sets below verbatim), so a trusted set copied from another
//! message under the attacker's own newer seal proves nothing; and an older set only
//! vouches for the message as it was then.

use mail_auth::arc::ChainValidation;
use mail_auth::{ArcOutput, DkimResult};

use super::dmarc::normalize;
use super::{ArcCheck, AuthResult};

/// The most recent set of a validated chain.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ArcLatest {
    /// Its ARC-Seal `d=`, lowercase.
    pub sealer: String,
    pub instance: u32,
    /// The results its ARC-Authentication-Results recorded.
    pub results: Vec<ResInfo>,
}

/// One `method=result` of an Authentication-Results payload, with its properties.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ResInfo {
    /// Lowercase, without a `/version`.
    pub method: String,
    /// Lowercase.
    pub result: String,
    /// `(ptype.property lowercase, value)`.
    pub props: Vec<(String, String)>,
}

impl ResInfo {
    fn prop(&self, name: &str) -> Option<&str> {
        self.props
            .iter()
            .find(|(k, _)| k == name)
            .map(|(_, v)| v.as_str())
    }
}

/// What the most recent set recorded about one From domain.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Claims {
    /// `dmarc=pass header.from=<our From domain>`.
    pub dmarc_pass: bool,
    /// A DMARC result other than pass for our From domain: the set does not vouch.
    pub dmarc_other: bool,
    /// `header.d` (else the domain of `header.i`) of each `dkim=pass`.
    pub dkim_pass: Vec<String>,
    /// The domain of `smtp.mailfrom` of each `spf=pass`.
    pub spf_pass: Vec<String>,
}

impl ArcLatest {
    /// What this set recorded for `from_domain` (compared case-insensitively, trailing
    /// dot ignored).
    pub fn claims(&self, from_domain: &str) -> Claims {
        let from = normalize(from_domain);
        let mut c = Claims::default();
        let domain_of = |v: &str| normalize(v.rsplit_once('@').map_or(v, |(_, d)| d));
        for r in &self.results {
            match r.method.as_str() {
                "dmarc" if r.prop("header.from").map(domain_of).as_deref() == Some(&from) => {
                    if r.result == "pass" {
                        c.dmarc_pass = true;
                    } else {
                        c.dmarc_other = true;
                    }
                }
                "dkim" if r.result == "pass" => {
                    if let Some(d) = r.prop("header.d").or_else(|| r.prop("header.i")) {
                        c.dkim_pass.push(domain_of(d));
                    }
                }
                "spf" if r.result == "pass" => {
                    if let Some(d) = r.prop("smtp.mailfrom") {
                        c.spf_pass.push(domain_of(d));
                    }
                }
                _ => {}
            }
        }
        c
    }
}

/// `sealer` is one of `trusted` or a subdomain of one (as the `arc_sealer` rule matches).
pub fn trusted(sealer: &str, trusted: &[String]) -> bool {
    crate::wire::domain::domain_in(sealer, trusted)
}

/// Our ARC check and, when the chain validated, its most recent set.
pub fn check(out: &ArcOutput<'_>) -> (ArcCheck, Option<ArcLatest>) {
    // RFC 8617 §4.4 (and the RFC 8601 registry) know only none, pass and fail for a
    // chain; mail-auth says neutral for a body hash mismatch or an expired signature,
    // which is a chain that does not validate: fail. A DNS error stays temperror.
    let result = match AuthResult::from(out.result()) {
        r @ (AuthResult::Pass | AuthResult::None | AuthResult::TempError) => r,
        _ => AuthResult::Fail,
    };
    let valid = matches!(out.result(), DkimResult::Pass);
    let sets = out.sets();
    let sealers = if valid {
        sets.iter()
            .rev()
            .map(|s| s.seal.header.d.to_ascii_lowercase())
            .collect()
    } else {
        Vec::new()
    };
    let latest = sets.last().filter(|_| valid).and_then(|set| {
        let seal = set.seal.header;
        let i = seal.i;
        // Checked by mail-auth already; repeated because the override depends on it.
        let cv_ok = match seal.cv {
            ChainValidation::Pass => i > 1,
            ChainValidation::None => i == 1,
            ChainValidation::Fail => false,
        };
        if !cv_ok || i as usize != sets.len() {
            return None;
        }
        let (aar_i, results) = parse_aar(&String::from_utf8_lossy(set.results.value))?;
        (aar_i == i).then(|| ArcLatest {
            sealer: normalize(&seal.d),
            instance: i,
            results,
        })
    });
    let check = ArcCheck {
        result,
        sealers,
        latest_sealer: latest.as_ref().map(|l| l.sealer.clone()),
        vouching_sealer: None,
    };
    (check, latest)
}

/// A lexical item of an Authentication-Results value (RFC 8601 §2.2 with RFC 5322 CFWS):
/// comments are dropped, quoted strings unquoted.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Tok {
    Word(String),
    Quoted(String),
    Special(char),
}

/// Splits `value` into tokens. `None` for an unterminated comment or quoted string.
fn tokens(value: &str) -> Option<Vec<Tok>> {
    let mut out = Vec::new();
    let mut chars = value.chars().peekable();
    while let Some(c) = chars.next() {
        match c {
            '(' => {
                let mut depth = 1usize;
                while depth > 0 {
                    match chars.next()? {
                        '\\' => {
                            chars.next()?;
                        }
                        '(' => depth += 1,
                        ')' => depth -= 1,
                        _ => {}
                    }
                }
            }
            '"' => {
                let mut s = String::new();
                loop {
                    match chars.next()? {
                        '\\' => s.push(chars.next()?),
                        '"' => break,
                        c => s.push(c),
                    }
                }
                out.push(Tok::Quoted(s));
            }
            ';' | '=' | '/' | '@' => out.push(Tok::Special(c)),
            c if c.is_whitespace() => {}
            c => {
                let mut s = String::from(c);
                while let Some(&n) = chars.peek() {
                    if n.is_whitespace() || matches!(n, '(' | '"' | ';' | '=' | '/' | '@') {
                        break;
                    }
                    s.push(n);
                    chars.next();
                }
                out.push(Tok::Word(s));
            }
        }
    }
    Some(out)
}

/// Parses an ARC-Authentication-Results value (RFC 8617 §4.1.1: `i=N;` then an RFC 8601
/// payload): the instance and the results. `None` when it does not parse; a result
/// that does not parse makes the whole field unusable, so that nothing half-read can
/// vouch for a message.
pub fn parse_aar(value: &str) -> Option<(u32, Vec<ResInfo>)> {
    let toks = tokens(value)?;
    let mut parts = toks.split(|t| *t == Tok::Special(';'));
    let instance = match parts.next()? {
        [Tok::Word(i), Tok::Special('='), Tok::Word(n)] if i.eq_ignore_ascii_case("i") => {
            n.parse::<u32>().ok()?
        }
        _ => return None,
    };
    // authserv-id [version]; the authserv-id is a value: a token or a quoted-string.
    match parts.next()? {
        [Tok::Word(_) | Tok::Quoted(_)] | [Tok::Word(_) | Tok::Quoted(_), Tok::Word(_)] => {}
        _ => return None,
    }
    let mut results = Vec::new();
    for part in parts {
        if part.is_empty() {
            continue;
        }
        if let [Tok::Word(w)] = part
            && w.eq_ignore_ascii_case("none")
        {
            continue;
        }
        results.push(resinfo(part)?);
    }
    Some((instance, results))
}

/// `method[/version] = result [reason=value] *(ptype.property = pvalue)`.
fn resinfo(toks: &[Tok]) -> Option<ResInfo> {
    let mut it = toks.iter().peekable();
    let Some(Tok::Word(method)) = it.next() else {
        return None;
    };
    if it.peek() == Some(&&Tok::Special('/')) {
        it.next();
        let Some(Tok::Word(_)) = it.next() else {
            return None;
        };
    }
    if it.next() != Some(&Tok::Special('=')) {
        return None;
    }
    let Some(Tok::Word(result)) = it.next() else {
        return None;
    };
    let mut props = Vec::new();
    while let Some(t) = it.next() {
        let Tok::Word(name) = t else {
            return None;
        };
        if it.next() != Some(&Tok::Special('=')) {
            return None;
        }
        let value = pvalue(&mut it)?;
        let name = name.to_ascii_lowercase();
        if name == "reason" {
            continue;
        }
        // ptype "." property
        if !name.contains('.') {
            return None;
        }
        props.push((name, value));
    }
    Some(ResInfo {
        method: method.to_ascii_lowercase(),
        result: result.to_ascii_lowercase(),
        props,
    })
}

/// `value / [[local-part] "@"] domain-name` (RFC 8601 §2.2 pvalue).
fn pvalue<'a>(it: &mut std::iter::Peekable<impl Iterator<Item = &'a Tok>>) -> Option<String> {
    let mut s = match it.next()? {
        Tok::Word(w) | Tok::Quoted(w) => w.clone(),
        Tok::Special('@') => {
            let Some(Tok::Word(d)) = it.next() else {
                return None;
            };
            return Some(format!("@{d}"));
        }
        Tok::Special(_) => return None,
    };
    if it.peek() == Some(&&Tok::Special('@')) {
        it.next();
        let Some(Tok::Word(d)) = it.next() else {
            return None;
        };
        s = format!("{s}@{d}");
    }
    Some(s)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn latest(aar: &str) -> ArcLatest {
        let (instance, results) = parse_aar(aar).expect("parses");
        ArcLatest {
            sealer: "sealer.example".into(),
            instance,
            results,
        }
    }

    #[test]
    fn parses_rfc8601_payloads() {
        let (i, r) = parse_aar(
            "i=2; mx.sealer.example (comment; dmarc=fail) 1;\r\n\tdkim=pass (good sig) header.d=Bank.Example header.s=s1;\r\n\tspf=pass smtp.mailfrom=\"bounce@bank.example\";\r\n\tdmarc/1=pass reason=\"aligned; dkim\" header.from=bank.example",
        )
        .unwrap();
        assert_eq!(i, 2);
        assert_eq!(r.len(), 3);
        assert_eq!(r[0].method, "dkim");
        assert_eq!(r[0].prop("header.d"), Some("Bank.Example"));
        assert_eq!(r[1].prop("smtp.mailfrom"), Some("bounce@bank.example"));
        assert_eq!(
            (r[2].method.as_str(), r[2].result.as_str()),
            ("dmarc", "pass")
        );
        assert_eq!(parse_aar("i=1; mx.example; none").unwrap().1, vec![]);
        let (_, r) =
            parse_aar("i=1; \"mx.example\" (c); dmarc=pass header.from=\"bank.example\";").unwrap();
        assert_eq!(r[0].prop("header.from"), Some("bank.example"));
        // Unparseable: nothing vouches.
        assert!(parse_aar("i=1; mx.example; dmarc=pass (unterminated").is_none());
        assert!(parse_aar("i=x; mx.example; dmarc=pass").is_none());
        assert!(parse_aar("mx.example; dmarc=pass header.from=bank.example").is_none());
        assert!(parse_aar("i=1; mx.example; dmarc=pass header.from").is_none());
    }

    #[test]
    fn claims_for_one_from_domain() {
        let l = latest("i=1; mx.sealer.example; dmarc=pass header.from=BANK.example.");
        assert!(l.claims("bank.example").dmarc_pass);
        assert_eq!(l.claims("other.example"), Claims::default());
        // Comments and quoted strings cannot smuggle a pass.
        let l = latest(
            "i=1; mx.sealer.example; dmarc=fail (dmarc=pass header.from=bank.example) header.from=bank.example; x=y reason=\"; dmarc=pass header.from=bank.example\"",
        );
        let c = l.claims("bank.example");
        assert!(!c.dmarc_pass && c.dmarc_other);
        // A recorded fail for our domain vetoes any other pass in the same set.
        let l = latest(
            "i=1; mx.s; dkim=pass header.d=bank.example; dmarc=fail header.from=bank.example",
        );
        assert!(l.claims("bank.example").dmarc_other);
        let l = latest(
            "i=1; mx.s; dkim=pass header.i=@mail.bank.example; spf=pass smtp.mailfrom=b@bank.example",
        );
        let c = l.claims("bank.example");
        assert_eq!(c.dkim_pass, ["mail.bank.example"]);
        assert_eq!(c.spf_pass, ["bank.example"]);
    }

    #[test]
    fn trusted_sealers_match_domain_or_subdomain() {
        let list = vec!["sealer.example".to_string()];
        assert!(trusted("sealer.example", &list));
        assert!(trusted("arc.sealer.example", &list));
        assert!(!trusted("evilsealer.example", &list));
        assert!(!trusted("sealer.example.evil", &list));
    }
}
