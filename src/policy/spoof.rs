//! Spoof flags (contract "Flags"): mail that pretends to come from a protected domain, from a
//! protected person, or from a domain that merely looks like a protected one.
//!
//! Everything about the protected side (normalised domains, registrable labels, confusable
//! skeletons, name tokens) is computed once in [`SpoofConfig::new`]; [`check`] folds only the one
//! message's display name and domains, then compares strings.
//!
//! Folding ("skeleton") = NFKC, invisible characters dropped, lowercase, Unicode TR39 confusable
//! skeleton (which maps `m`→`rn`, `1`→`l`, `0`→`O`, Cyrillic `а`→`a`, …), lowercase again,
//! combining marks (diacritics) dropped.

use mail_parser::{HeaderValue, parsers::MessageStream};
use unicode_normalization::{UnicodeNormalization, char::is_combining_mark};

/// What the spoof checks need to know about one message.
pub struct SpoofInput<'a> {
    /// Header From: display name (decoded, may be empty) and address (may be empty if unparsable).
    pub from_display_name: &'a str,
    pub from_address: &'a str,
    /// RFC 5321 MAIL FROM address ("" for the null sender).
    pub mail_from: &'a str,
    /// The message arrived on an inbound (internet-facing) listener.
    pub inbound: bool,
    /// DMARC passed (aligned SPF or DKIM for the From domain).
    pub dmarc_pass: bool,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Flag {
    OwnDomainSpoof,
    DisplayNameSpoof,
    LookalikeDomain,
}

impl Flag {
    pub const ALL: [Flag; 3] = [
        Flag::OwnDomainSpoof,
        Flag::DisplayNameSpoof,
        Flag::LookalikeDomain,
    ];

    pub fn as_str(&self) -> &'static str {
        match self {
            Flag::OwnDomainSpoof => "own-domain-spoof",
            Flag::DisplayNameSpoof => "display-name-spoof",
            Flag::LookalikeDomain => "lookalike-domain",
        }
    }

    /// The flag named `s` as written in policy files (ASCII case-insensitive).
    pub fn parse(s: &str) -> Option<Flag> {
        Flag::ALL
            .into_iter()
            .find(|f| f.as_str().eq_ignore_ascii_case(s.trim()))
    }
}

/// Two-level public suffixes: under these the registrable domain is three labels (`example.co.uk`).
/// A short list instead of the full Public Suffix List; elsewhere the last two labels are taken,
/// which for an unlisted suffix only makes the look-alike check compare the wrong label (no flag).
const TWO_LEVEL_SUFFIXES: &[&str] = &[
    "co.uk", "org.uk", "ac.uk", "gov.uk", "me.uk", "ltd.uk", "plc.uk", "com.au", "net.au",
    "org.au", "edu.au", "gov.au", "co.nz", "org.nz", "co.jp", "ne.jp", "or.jp", "ac.jp", "co.za",
    "co.in", "co.kr", "co.il", "com.br", "com.cn", "com.mx", "com.tr", "com.sg", "com.hk",
    "com.tw", "com.ar",
];

/// A domain prepared for comparison: its registrable part split into label and suffix.
#[derive(Debug, Clone)]
struct Domain {
    /// Unicode form (IDNA-decoded, lowercase), e.g. `mail.éxample.org`.
    name: String,
    /// Registrable domain, e.g. `éxample.org`.
    reg: String,
    /// Registrable label without diacritics (`example`) and its length in chars.
    label_plain: String,
    label_len: usize,
    /// Confusable skeletons of the registrable label and of the public suffix.
    label_skel: String,
    suffix_skel: String,
}

impl Domain {
    fn new(name: String) -> Domain {
        let suffix = TWO_LEVEL_SUFFIXES
            .iter()
            .copied()
            .find(|s| {
                name.len() > s.len() + 1
                    && name.ends_with(s)
                    && name.as_bytes()[name.len() - s.len() - 1] == b'.'
            })
            .or_else(|| name.rsplit_once('.').map(|(_, tld)| tld))
            .unwrap_or("");
        let rest = name[..name.len() - suffix.len()].trim_end_matches('.');
        let label = rest.rsplit('.').next().unwrap_or(rest);
        let label_plain: String = label.nfd().filter(|&c| !is_combining_mark(c)).collect();
        Domain {
            reg: name[rest.len() - label.len()..].to_owned(),
            label_len: label_plain.chars().count(),
            label_skel: domain_skeleton(label),
            suffix_skel: domain_skeleton(suffix),
            label_plain,
            name,
        }
    }

    /// Equal to or a subdomain of `self`.
    fn covers(&self, other: &str) -> bool {
        other
            .strip_suffix(self.name.as_str())
            .is_some_and(|head| head.is_empty() || head.ends_with('.'))
    }
}

/// A protected person's name as folded tokens (`["alice", "example"]`) and joined (`aliceexample`).
#[derive(Debug, Clone)]
struct Name {
    original: String,
    tokens: Vec<String>,
    joined: String,
}

impl Name {
    fn new(raw: &str) -> Option<Name> {
        let tokens: Vec<String> = name_tokens(&fold(raw, true)).map(str::to_owned).collect();
        let (original, joined) = (raw.trim().to_owned(), tokens.concat());
        (!tokens.is_empty()).then_some(Name {
            original,
            tokens,
            joined,
        })
    }
}

/// Protected domains and people, prepared once from config (normalised, skeletons precomputed).
#[derive(Debug, Clone)]
pub struct SpoofConfig {
    domains: Vec<Domain>,
    names: Vec<Name>,
    distance: usize,
}

impl SpoofConfig {
    pub fn new(
        protected_domains: &[String],
        protected_names: &[String],
        lookalike_distance: usize,
    ) -> SpoofConfig {
        let domains = protected_domains
            .iter()
            .filter_map(|d| normalize_domain(d))
            .map(Domain::new)
            .collect();
        let names = protected_names
            .iter()
            .filter_map(|n| Name::new(n))
            .collect();
        SpoofConfig {
            domains,
            names,
            distance: lookalike_distance,
        }
    }

    /// The protected domain that `domain` (normalised) is equal to or a subdomain of.
    fn protected(&self, domain: &str) -> Option<&Domain> {
        self.domains.iter().find(|p| p.covers(domain))
    }

    /// Why `display` impersonates a protected person or address, if it does.
    fn display_name_match(&self, display: &str) -> Option<String> {
        // An address shown as the name ("alice@example.org" <x@evil.test>): NFKC first so that
        // fullwidth ＠ and friends count as well.
        let nfkc: String = display.nfkc().filter(|&c| !is_invisible(c)).collect();
        let shown = nfkc.split(|c: char| c.is_whitespace() || "<>()[]\"',;:".contains(c));
        for word in shown {
            if let Some((_, dom)) = word.rsplit_once('@')
                && let Some(p) = normalize_domain(dom).and_then(|d| self.protected(&d))
            {
                return Some(format!(
                    "display name shows {word}, in protected {}",
                    p.name
                ));
            }
        }
        // Two foldings: lowercase before the skeleton is proper case-insensitivity ("ALICE"),
        // skeleton before lowercase also catches a capital I posing as an l ("AIice").
        let lower_first = fold(display, true);
        let skel_first = fold(display, false);
        for folded in [&lower_first, &skel_first] {
            let hay: Vec<&str> = name_tokens(folded).collect();
            if let Some(n) = self.names.iter().find(|n| name_matches(&hay, n)) {
                return Some(format!("display name {display:?} matches {:?}", n.original));
            }
            if skel_first == lower_first {
                break;
            }
        }
        None
    }

    /// Why `name` (normalised) looks like a protected domain without being one, if it does.
    fn lookalike(&self, name: &str) -> Option<String> {
        if self.protected(name).is_some() {
            return None;
        }
        let cand = Domain::new(name.to_owned());
        self.domains.iter().find_map(|p| {
            if cand.reg == p.reg {
                // Same registrable domain as a protected subdomain (mail.example.org): same owner.
                return None;
            }
            if cand.suffix_skel != p.suffix_skel {
                return None;
            }
            if cand.label_skel == p.label_skel {
                return Some(format!("{name} looks like {} (same skeleton)", p.name));
            }
            // Typos only for labels long enough that a few edits do not hit unrelated names.
            if cand.label_len <= 3 || p.label_len <= 3 {
                return None;
            }
            // Edits as typed (exmple) or on top of a homoglyph (exarnpel); lengths first, as
            // the distance can be no smaller than their difference.
            let edits = |a: &str, b: &str| {
                let close = a.chars().count().abs_diff(b.chars().count()) <= self.distance;
                close
                    .then(|| strsim::damerau_levenshtein(a, b))
                    .filter(|&d| d <= self.distance)
            };
            let d = edits(&cand.label_plain, &p.label_plain)
                .or_else(|| edits(&cand.label_skel, &p.label_skel))?;
            Some(format!("{name} looks like {} ({d} edit(s) away)", p.name))
        })
    }
}

/// Every flag that applies, with a short human reason for each (for logs and the decision trace).
pub fn check(cfg: &SpoofConfig, input: &SpoofInput<'_>) -> Vec<(Flag, String)> {
    let mut flags = Vec::new();
    let from_domain = address_domain(input.from_address);
    let from_protected = from_domain.as_deref().and_then(|d| cfg.protected(d));

    if let (Some(d), Some(p)) = (&from_domain, from_protected)
        && input.inbound
        && !input.dmarc_pass
    {
        let reason = format!(
            "From domain {d} is within protected {} but DMARC did not pass",
            p.name
        );
        flags.push((Flag::OwnDomainSpoof, reason));
    }

    // Contract: DMARC pass ⇒ never; an address inside the protected domains is own-domain's business.
    if !input.dmarc_pass
        && from_protected.is_none()
        && let Some(reason) = cfg.display_name_match(input.from_display_name)
    {
        flags.push((Flag::DisplayNameSpoof, reason));
    }

    let mail_from_domain =
        address_domain(input.mail_from).filter(|d| Some(d) != from_domain.as_ref());
    let reasons: Vec<String> = [("From", from_domain), ("MAIL FROM", mail_from_domain)]
        .into_iter()
        .filter_map(|(what, d)| Some(format!("{what} domain {}", cfg.lookalike(&d?)?)))
        .collect();
    if !reasons.is_empty() {
        flags.push((Flag::LookalikeDomain, reasons.join("; ")));
    }
    flags
}

/// Splits an RFC 5322 From header value into (display name, address) for its first mailbox.
/// See [`parse_from_mailboxes`].
pub fn parse_from_header(value: &str) -> (String, String) {
    parse_from_mailboxes(value)
        .into_iter()
        .next()
        .unwrap_or_default()
}

/// Every mailbox of an RFC 5322 address-list header value as (display name, address), decoding
/// RFC 2047 encoded-words in display names (=?utf-8?B?...?= and ?Q?), handling quoted strings,
/// comments and bare addr-specs; the mailboxes of groups are included, a group with none adds none.
///
/// Uses mail-parser's address parser (the one mail-auth uses for DMARC), so every charset it knows
/// decodes; a comment stands in for a missing name.
pub fn parse_from_mailboxes(value: &str) -> Vec<(String, String)> {
    let mut line = value.trim().to_owned();
    line.push_str("\r\n");
    let parsed = MessageStream::new(line.as_bytes()).parse_address();
    let HeaderValue::Address(list) = &parsed else {
        return Vec::new();
    };
    list.iter()
        .map(|addr| {
            let name = addr.name.as_deref().unwrap_or("").trim().to_owned();
            let address = addr.address.as_deref().unwrap_or("").trim();
            // Obsolete source route `<@relay:user@host>`: the mailbox is after the colon.
            let address = match address.split_once(':') {
                Some((route, mailbox)) if route.starts_with('@') => mailbox,
                _ => address,
            };
            (name, address.to_owned())
        })
        .collect()
}

/// The normalised domain of an address, None for the null sender, no `@` or a domain literal.
fn address_domain(address: &str) -> Option<String> {
    normalize_domain(address.trim().trim_matches(['<', '>']).rsplit_once('@')?.1)
}

/// IDNA-decoded (UTS 46: lowercase, NFC), trailing dot removed; undecodable input is lowercased as is.
fn normalize_domain(raw: &str) -> Option<String> {
    let raw = raw.trim().trim_end_matches('.');
    if raw.is_empty() || raw.starts_with('[') {
        return None;
    }
    let (unicode, result) = idna::domain_to_unicode(raw);
    Some(result.map_or_else(|_| raw.to_lowercase(), |()| unicode))
}

/// See the module doc. `lower_first` picks whether case is folded before or only after the skeleton.
fn fold(s: &str, lower_first: bool) -> String {
    let mut pre: String = s.nfkc().filter(|&c| !is_invisible(c)).collect();
    if lower_first {
        pre = pre.to_lowercase();
    }
    unicode_security::skeleton(&pre)
        .flat_map(char::to_lowercase)
        .filter(|&c| !is_combining_mark(c))
        .collect()
}

/// [`fold`] plus `vv`→`w`, a classic domain trick that TR39 (which does have `m`→`rn`) lacks.
fn domain_skeleton(s: &str) -> String {
    fold(s, true).replace("vv", "w")
}

/// Words of a folded name; single characters (initials, stray letters) are dropped so that
/// "Alice B. Example" still reads as "alice example".
fn name_tokens(folded: &str) -> impl Iterator<Item = &str> {
    folded
        .split(|c: char| !c.is_alphanumeric())
        .filter(|t| t.chars().nth(1).is_some())
}

/// A protected name matches when its words appear together in the display name in order or
/// rotated ("Example, Alice"), with other words around them allowed ("Alice Example (CEO)").
/// A one-word protected name must be the whole display name: "Alice" alone is too common.
/// The words run together ("AliceExample") match too.
fn name_matches(hay: &[&str], name: &Name) -> bool {
    let n = name.tokens.len();
    if n == 1 {
        return hay.len() == 1 && hay[0] == name.tokens[0];
    }
    let rotated = |w: &[&str], k: usize| {
        let needle = name.tokens[k..].iter().chain(&name.tokens[..k]);
        w.iter().zip(needle).all(|(a, b)| a == b)
    };
    hay.contains(&name.joined.as_str()) || hay.windows(n).any(|w| (0..n).any(|k| rotated(w, k)))
}

/// Default-ignorable code points: zero-width spaces and joiners, bidi controls, variation selectors,
/// soft hyphen, Hangul fillers, tags. They render as nothing, so they must not split or hide a name.
fn is_invisible(c: char) -> bool {
    matches!(c, '\u{AD}' | '\u{34F}' | '\u{61C}' | '\u{115F}' | '\u{1160}' | '\u{17B4}' | '\u{17B5}'
        | '\u{180B}'..='\u{180F}' | '\u{200B}'..='\u{200F}' | '\u{202A}'..='\u{202E}'
        | '\u{2060}'..='\u{206F}' | '\u{3164}' | '\u{FE00}'..='\u{FE0F}' | '\u{FEFF}' | '\u{FFA0}'
        | '\u{1BCA0}'..='\u{1BCA3}' | '\u{E0000}'..='\u{E0FFF}')
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cfg(distance: usize) -> SpoofConfig {
        let words = |s: &str| s.split_whitespace().map(String::from).collect::<Vec<_>>();
        let domains = words("example.org Example.CO.UK ibm.com widget.com mail.corp.test");
        SpoofConfig::new(&domains, &["Alice Example".into(), "Bob".into()], distance)
    }

    /// `From header | MAIL FROM | listener, DMARC | expected flags`.
    const CASES: &[&str] = &[
        "Carol <carol@example.org>         | x@evil.test       | in fail  | own-domain-spoof",
        "carol@MAIL.Example.ORG.           |                   | in fail  | own-domain-spoof",
        "carol@example.org                 | carol@example.org | in pass  |",
        "carol@example.org                 |                   | out fail |",
        "carol@notexample.org              |                   | in fail  |",
        "Alice Example <alice@gmail.com>   | alice@gmail.com   | in fail  | display-name-spoof",
        "\"ALICE   EXAMPLE\" <a@x.test>    |                   | in fail  | display-name-spoof",
        "\"Example, Alice\" <a@x.test>     |                   | in fail  | display-name-spoof",
        "Alïce Exämple <a@x.test>          |                   | in fail  | display-name-spoof",
        "\u{410}lice Example <a@x.test>    |                   | in fail  | display-name-spoof", // Cyrillic
        "AIice Example <a@x.test>          |                   | in fail  | display-name-spoof", // I for l
        "Ali\u{200B}ce Ex\u{AD}ample <a@x.test> |              | in fail  | display-name-spoof",
        "Alice Example (CEO) <a@x.test>    |                   | in fail  | display-name-spoof",
        "\"Dr. Alice B. Example, CEO\" <a@x.test> |            | in fail  | display-name-spoof",
        "AliceExample <a@x.test>           |                   | in fail  | display-name-spoof",
        "=?utf-8?B?QWxpY2UgRXhhbXBsZQ==?= <a@x.test> |         | in fail  | display-name-spoof",
        "bob <bob@x.test>                  |                   | out fail | display-name-spoof",
        "\"alice@example.org\" <evil@x.test> |                 | in fail  | display-name-spoof",
        "\"ＣＥＯ ａｌｉｃｅ＠ｅｘａｍｐｌｅ．ｏｒｇ\" <evil@x.test> | | in fail | display-name-spoof",
        "Alice Example <>                  |                   | in fail  | display-name-spoof",
        "Alice Examples <a@x.test>         |                   | in fail  |",
        "Alice <a@x.test>                  |                   | in fail  |",
        "Bob Smith <a@x.test>              |                   | in fail  |",
        // The real Alice, aligned; and (contract) a DMARC pass is never display-name spoof.
        "Alice Example <alice@example.org> | alice@example.org | in pass  |",
        "Alice Example <alice@gmail.com>   | alice@gmail.com   | in pass  |",
        // Inside a protected domain without DMARC: own-domain spoof covers it, not display-name.
        "Alice Example <alice@example.org> |                   | in fail  | own-domain-spoof",
        // MAIL FROM alone counts; DMARC pass does not excuse a look-alike.
        "x@gmail.com                       | b@examp1e.org     | in pass  | lookalike-domain",
        "Bob <b@xn--xample-9ua.org>        | b@example.org     | in fail  | \
         display-name-spoof lookalike-domain",
    ];

    /// Runs one row of [`CASES`].
    fn run(case: &str) -> Vec<(Flag, String)> {
        let cols: Vec<&str> = case.split('|').map(str::trim).collect();
        let (name, address) = parse_from_header(cols[0]);
        let input = SpoofInput {
            from_display_name: &name,
            from_address: &address,
            mail_from: cols[1],
            inbound: cols[2].starts_with("in"),
            dmarc_pass: cols[2].ends_with("pass"),
        };
        check(&cfg(1), &input)
    }

    #[test]
    fn check_cases() {
        for case in CASES {
            let got: Vec<&str> = run(case).iter().map(|(f, _)| f.as_str()).collect();
            let want = case.rsplit('|').next().unwrap().trim();
            assert_eq!(got.join(" "), want, "{case}");
        }
    }

    #[test]
    fn reasons_name_what_matched() {
        let flags = run("Alice Example <a@xn--xample-9ua.org> | | in fail");
        let reasons: Vec<String> = flags.into_iter().map(|f| f.1).collect();
        let want = [
            r#"display name "Alice Example" matches "Alice Example""#,
            "From domain éxample.org looks like example.org (same skeleton)",
        ];
        assert_eq!(reasons, want);
    }

    fn lookalike(cfg: &SpoofConfig, domain: &str) -> bool {
        cfg.lookalike(&normalize_domain(domain).unwrap()).is_some()
    }

    #[test]
    fn lookalike_domains() {
        let c = cfg(1);
        for domain in [
            "exarnple.org",       // rn → m
            "examp1e.org",        // 1 → l
            "xn--xample-9ua.org", // éxample.org
            "exampel.org",        // transposition
            "exmple.org",         // deletion
            "exarnpel.org",       // homoglyph and transposition
            "mail.exarnple.org",  // subdomain of a look-alike
            "exarnple.co.uk",     // two-level public suffix
            "ibrn.com",           // short label: exact skeleton only
            "vvidget.com",        // vv → w
            "c0rp.test",          // protected mail.corp.test
        ] {
            assert!(lookalike(&c, domain), "{domain}");
        }
        let unrelated = "example.org.evil.com example.co example.net example.uk ibn.com \
            evil.co.uk corp.test other.corp.test sub.example.org unrelated.org exanpel.org";
        for domain in unrelated.split_whitespace() {
            assert!(!lookalike(&c, domain), "{domain}");
        }
        assert!(!lookalike(&cfg(0), "exampel.org") && lookalike(&cfg(0), "exarnple.org"));
        // A typo domain the organisation owns and protects is not flagged.
        let owned = SpoofConfig::new(&["example.org".into(), "examp1e.org".into()], &[], 1);
        assert!(!lookalike(&owned, "examp1e.org"));
    }

    #[test]
    fn from_header_parsing() {
        let cases = [
            "Alice Example <alice@gmail.com>            | Alice Example  | alice@gmail.com",
            "\"Example, Alice\" <a@b.test>              | Example, Alice | a@b.test",
            "alice@example.org (Alice Example)          | Alice Example  | alice@example.org",
            "alice@example.org                          |                | alice@example.org",
            "=?utf-8?B?w4lsaXNl?= <e@x.test>            | Élise          | e@x.test",
            "=?UTF-8?Q?Al=C3=AFce_Example?= <a@x.test>  | Alïce Example  | a@x.test",
            "=?iso-8859-1?q?J=F6rg?= <j@x.test>         | Jörg           | j@x.test",
            "Alice\r\n Example <a@x.test>, b@y.test     | Alice Example  | a@x.test",
            "<@relay.test:a@x.test>                     |                | a@x.test",
            "garbage                                    | garbage        |",
            "                                           |                |",
            "undisclosed-recipients:;                   |                |",
        ];
        for case in cases {
            let cols: Vec<&str> = case.split('|').map(str::trim).collect();
            let want = (cols[1].to_owned(), cols[2].to_owned());
            assert_eq!(parse_from_header(cols[0]), want, "{case}");
        }
    }

    #[test]
    fn flag_names() {
        for f in Flag::ALL {
            assert_eq!(Flag::parse(f.as_str()), Some(f));
        }
        assert_eq!(
            Flag::parse(" Lookalike-Domain"),
            Some(Flag::LookalikeDomain)
        );
        assert_eq!(Flag::parse("spoof"), None);
    }
}
